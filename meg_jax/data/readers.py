"""Reading an edit file of any supported format into `EditRecord`s.

Formats (names accepted by `read_edits(format=...)`):

  zsre         MEND/ROME `zsre_mend_eval.json`, `zsre_mend_train*.json`;
               recognised by `src` and `answers`
  counterfact  ROME/MEMIT `counterfact.json`, `multi_counterfact.json`;
               recognised by `requested_rewrite`
  easyedit_cf  EasyEdit flat CounterFact (`counterfact-edit.json`);
               recognised by `rephrase_prompt`, or `ground_truth` with `target_new`
  user         meg_jax's plain schema (`readers_user`); recognised by `prompt` and `target`

Detection looks only at the first record; every record is then validated against the detected
(or explicitly given) format, so a mixed file fails at the first record that does not fit.
"""

import os
from collections.abc import Callable, Mapping
from typing import Any

from meg_jax.data.jsonio import read_records
from meg_jax.data.readers_counterfact import easyedit_counterfact_record, rome_counterfact_record
from meg_jax.data.readers_user import user_record
from meg_jax.data.readers_zsre import ZsreTarget, zsre_record
from meg_jax.data.records import (
    DEFAULT_MAX_CHARS,
    DataFormatError,
    EditRecord,
    Source,
    check_text_lengths,
)

FORMATS = ("zsre", "counterfact", "easyedit_cf", "user")


def detect_format(first: Any, file: str) -> str:
    """The format name of a file whose first record is `first` (see the module table)."""
    if not isinstance(first, Mapping):
        raise DataFormatError(
            f"{file}: record 0: expected a JSON object, got {type(first).__name__}"
        )
    keys = set(first)
    if "requested_rewrite" in keys:
        return "counterfact"
    if {"src", "answers"} <= keys:
        return "zsre"
    if "rephrase_prompt" in keys or {"ground_truth", "target_new"} <= keys:
        return "easyedit_cf"
    if {"prompt", "target"} <= keys:
        return "user"
    raise DataFormatError(
        f"{file}: record 0: cannot tell the format from fields {sorted(keys)}; expected "
        "'requested_rewrite' (ROME CounterFact), 'src'+'answers' (zsRE), 'rephrase_prompt' "
        "(EasyEdit CounterFact) or 'prompt'+'target' (user edits); or pass format= explicitly"
    )


def _converter(fmt: str, zsre_target: ZsreTarget) -> Callable[[Any, Source], EditRecord]:
    if fmt == "zsre":
        return lambda obj, source: zsre_record(obj, source, zsre_target)
    return {
        "counterfact": rome_counterfact_record,
        "easyedit_cf": easyedit_counterfact_record,
        "user": user_record,
    }[fmt]


def records_from_objects(
    objects: list[Any],
    file: str,
    format: str | None = None,
    zsre_target: ZsreTarget = "answers",
    max_chars: int = DEFAULT_MAX_CHARS,
) -> list[EditRecord]:
    """Converts parsed JSON records (from `file`, named in errors) to `EditRecord`s.

    `format` overrides detection. Ids must be unique: stages downstream key weights and cached
    answers by id, so a duplicate is an error naming both records. Every text (prompt, target,
    paraphrase, ...) must have at most `max_chars` characters.
    """
    _check_positive("max_chars", max_chars)
    if not objects:
        raise DataFormatError(f"{file}: no records")
    fmt = format if format is not None else detect_format(objects[0], file)
    if fmt not in FORMATS:
        raise ValueError(f"unknown edit-file format {fmt!r}; expected one of {FORMATS}")
    convert = _converter(fmt, zsre_target)
    records = [convert(obj, Source(file, i)) for i, obj in enumerate(objects)]
    for record in records:
        check_text_lengths(record, max_chars)
    first_index_of_id: dict[int, int] = {}
    for record in records:
        earlier = first_index_of_id.setdefault(record.id, record.source.index)
        if earlier != record.source.index:
            raise DataFormatError(
                f"{record.source.describe('id')}: id {record.id} repeats record {earlier}'s"
            )
    return records


def read_edits(
    path: str | os.PathLike,
    format: str | None = None,
    zsre_target: ZsreTarget = "answers",
    limit: int | None = None,
    max_chars: int = DEFAULT_MAX_CHARS,
) -> list[EditRecord]:
    """Reads an edit file (JSON array or JSON Lines) of any format in `FORMATS`.

    Args:
      path: the file.
      format: one of `FORMATS`; None detects it from the first record.
      zsre_target: for zsRE, `"answers"` (MeG/MEMIT: `answers[0]`) or `"alt"` (EasyEdit).
      limit: keep only the first `limit` (>= 1) records; None keeps all. All are still parsed,
        to catch file errors.
      max_chars: the longest text (prompt, target, paraphrase, ...) accepted, in characters.
    """
    if limit is not None:
        _check_positive("limit", limit)
    records = records_from_objects(
        read_records(path), str(path), format, zsre_target, max_chars=max_chars
    )
    return records if limit is None else records[:limit]


def _check_positive(name: str, value) -> None:
    # A negative limit would slice from the end (limit=-1 silently dropped the last record).
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
