"""Edit sources named by a config: one file, or several merged ("a+b"), and the pseudo-edit split.

A source spec is what `data.edits`, `data.pseudo`, `data.add` and `evaluation.edits` hold:

    "zsre/zsre_mend_eval.json"                                    one file
    "zsre/zsre_mend_eval.json+zsre/zsre_mend_train_10000.json"    two files, merged in this order

Each part is resolved by `meg_jax.data.locate` (a path, a file under the data directory, or a
known dataset name). A spec that is itself an existing file is one file, even if its name holds a
"+". A string, not a list, so that the same spec works in a config file and as a command-line
override (`--config.data.edits=a+b`).

Merging (METHOD.md §1.4: the paper merges zsRE's eval and train_10000 files, 29,086 records,
before deduplicating by subject). Records keep their order, file by file. Each record keeps its
`Source` (file and index in that file), so errors still point at the line to fix. Ids must stay
unique, since banks and caches are keyed by them: when any id of a later file repeats an id of
the files before it, all of that file's ids are shifted by one past the largest id so far. For
zsRE's position ids this gives eval 0..19,085 and train_10000 19,086..29,085. Offsets come from
whole files, so an id never depends on how many records a run read.

The pseudo-edit split (`pseudo_split`) and its check against the edit set (`check_disjoint`)
are at the end of this module.
"""

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from meg_jax.data.download import load_edits
from meg_jax.data.locate import locate
from meg_jax.data.preprocess import dedup_by_subject
from meg_jax.data.records import DataFormatError, EditRecord

SEPARATOR = "+"

log = logging.getLogger(__name__)

Locate = Callable[[str], tuple[Path, str]]


def split_spec(spec: str, field: str = "data.edits") -> list[str]:
    """The file names of a source spec (module docstring), in order; `field` names it in errors."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"{field}: expected a file or dataset name, got {spec!r}")
    if SEPARATOR not in spec or Path(spec).expanduser().is_file():
        return [spec]
    parts = [p.strip() for p in spec.split(SEPARATOR)]
    if not all(parts):
        raise ValueError(
            f"{field}: {spec!r} has an empty name between '{SEPARATOR}' signs; expected "
            f"'a{SEPARATOR}b' with both named"
        )
    if len(set(parts)) != len(parts):
        raise ValueError(f"{field}: {spec!r} names a file twice; each record would be read twice")
    return parts


def locate_spec(spec: str, field: str = "data.edits", find: Locate = locate) -> list[Path]:
    """The resolved path of every file of `spec`, logging where each was found."""
    paths = []
    for name in split_spec(spec, field):
        path, how = find(name)
        log.info("data: %s", how)
        paths.append(path)
    return paths


def merge_records(files: Sequence[list[EditRecord]]) -> list[EditRecord]:
    """The records of several files in order, ids made unique (module docstring)."""
    merged: list[EditRecord] = []
    taken: set[int] = set()
    for records in files:
        ids = {r.id for r in records}
        if taken and ids & taken:
            shift = max(taken) + 1 - min(ids, default=0)
            records = [dataclasses.replace(r, id=r.id + shift) for r in records]
            file = records[0].source.file if records else "?"
            log.info("data: %s ids repeat earlier files' ids; shifted by %d", file, shift)
        merged += records
        taken |= {r.id for r in records}
    return merged


def read_spec(
    spec: str,
    limit: int | None = None,
    field: str = "data.edits",
    find: Locate = locate,
    read: Callable[[Path], list[EditRecord]] | None = None,
) -> list[EditRecord]:
    """The merged records of every file of `spec`; the first `limit` of them when given.

    Every file is read whole (ids are offset by whole files), so `limit` only trims the result.
    `read` (a path -> records function, default `load_edits`) is replaceable for tests.
    """
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"limit: expected a positive integer or None, got {limit!r}")
    read = read or load_edits
    merged = merge_records([read(p) for p in locate_spec(spec, field, find)])
    return merged if limit is None else merged[:limit]


# ---------------------------------------------------------------------------------------------
# The pseudo-edit split


def _same_record_key(record: EditRecord) -> tuple[str, int]:
    """Identity of a record as read: its file (resolved) and its index in that file."""
    return os.path.realpath(record.source.file), record.source.index


def pseudo_split(
    pseudo: list[EditRecord], edit_pool: list[EditRecord], by_subject: bool
) -> list[EditRecord]:
    """The pseudo-edit candidates: `pseudo` less anything the edits could draw on.

    With `by_subject` (MeG's zsRE, METHOD.md §1.4), a pseudo record is dropped when its subject
    or its prompt is also that of a record of `edit_pool` (every record of the edit sources,
    not only the first N kept, so the split does not move when `n_edits` grows and the encoder
    need not be retrained); the rest are deduplicated by subject, first kept. The reference
    drops `zsre_mend_train` records whose `src` is in `zsre_mend_train_10000`, then dedups: the
    subject rule contains it and also keeps `zsre_mend_eval`'s subjects out.

    A record that is in both lists (the same file and index: the pseudo-edits are the far end of
    the edit file itself, as the CounterFact configs and the tiny zsRE config take them) is
    not held against itself. Deduplication then keeps a subject's first record, in the edit
    region, so the far end keeps only subjects the edits never reach; `check_disjoint` catches
    an edit set grown into that end.

    Without `by_subject` (CounterFact) `pseudo` is returned as is.
    """
    if not by_subject:
        return list(pseudo)
    own = {_same_record_key(r) for r in pseudo}
    others = [r for r in edit_pool if _same_record_key(r) not in own]
    subjects = {r.subject for r in others if r.subject is not None}
    prompts = {r.prompt for r in others}
    kept = [r for r in pseudo if r.subject not in subjects and r.prompt not in prompts]
    unique = dedup_by_subject(kept)
    if len(unique) < len(pseudo):
        log.info(
            "data: pseudo-edits: %d of %d records kept (%d share a subject or prompt with the "
            "edit sources, %d repeat a subject)",
            len(unique),
            len(pseudo),
            len(pseudo) - len(kept),
            len(kept) - len(unique),
        )
    return unique


def check_disjoint(
    edits: Sequence[EditRecord], pseudo: Sequence[EditRecord], by_subject: bool
) -> int:
    """Errors when an edit is one of the pseudo-edits used; returns how many share a subject.

    The same record on both sides (an edit set grown into the pseudo-edit end of a shared file)
    means the encoder trained on, and the router calibrated with, an edit's own paraphrase: an
    error naming both. With `by_subject`, edits about a pseudo-edit's subject (only possible
    through `data.add`, since `pseudo_split` removed the edit sources' subjects) are counted
    and logged as a warning.
    """
    used = {_same_record_key(r): r for r in pseudo}
    for record in edits:
        other = used.get(_same_record_key(record))
        if other is not None:
            raise DataFormatError(
                f"{record.source.describe()}: edit id {record.id} is also a pseudo-edit (the "
                "encoder's pairs or the router's calibration records); the edit set reaches into "
                "the pseudo-edit end of the file. Lower data.n_edits, lower data.n_pseudo_pairs "
                "and data.n_calibration, or take the pseudo-edits from another file"
            )
    if not by_subject:
        return 0
    subjects = {r.subject for r in pseudo if r.subject is not None}
    shared = [r for r in edits if r.subject is not None and r.subject in subjects]
    if shared:
        log.warning(
            "data: %d edits share a subject with a pseudo-edit (first: %s, subject %r)",
            len(shared),
            shared[0].source.describe(),
            shared[0].subject,
        )
    return len(shared)
