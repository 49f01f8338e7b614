"""What a stage was trained on: input fingerprints, the record beside its outputs, and the verdict.

A stage's inputs are three things, kept apart because they change for different reasons:
  config    the stage's own settings (a JSON-able dict);
  upstream  the identities of the artefacts it reads (other stages' lineage ids, file hashes);
  items     the edits it covers, in order, as (dataset id, content hash) pairs.

`<stage dir>/stage.json` records them when the stage starts and marks the stage finished when its
artefact is written. A rerun compares the new inputs with the record (`decide`):
  skip     same inputs, finished: nothing is re-entered (a rerun changes nothing);
  resume   same inputs, unfinished: continue from the stage's own checkpoints;
  extend   same config and upstream, finished, and the items a strict superset of the recorded
           ones: the stage adds the new items to its artefact (incremental editing);
  fresh    no record, or `retrain`;
anything else raises `StageInputsChanged`, naming the stage, what changed and the ways out.
Nothing here knows any stage; the pipeline decides what each stage's inputs are.
"""

import copy
import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from meg_jax.infra.files import write_json_atomic

Verdict = Literal["fresh", "skip", "resume", "extend"]
RECORD = "stage.json"


def digest(obj: Any) -> str:
    """SHA-256 (hex) of a JSON-able object in canonical form (sorted keys, no spaces)."""
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=_json)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def array_digest(*arrays: np.ndarray) -> str:
    """SHA-256 (hex) of arrays' dtypes, shapes and bytes (e.g. a weight bank's content)."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 (hex) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _json(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, np.generic | np.ndarray):
        return np.asarray(value).tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot fingerprint a {type(value).__name__}")


@dataclasses.dataclass(frozen=True)
class StageInputs:
    """What one stage is given (see the module docstring)."""

    config: dict
    upstream: dict
    items: tuple[tuple[int, str], ...] = ()

    @property
    def lineage(self) -> str:
        """Identity of everything but the items: downstream stages depend on this, so extending
        a stage's items does not count as a change of what it is."""
        return digest({"config": self.config, "upstream": self.upstream})[:16]

    @property
    def fingerprint(self) -> str:
        """Identity of all inputs, items included (names a run directory: a resume can only ever
        continue the run of the same inputs)."""
        return digest({"lineage": self.lineage, "items": self.items})[:16]

    def to_json(self) -> dict:
        return {
            "config": self.config,
            "upstream": self.upstream,
            "items": [list(i) for i in self.items],
            "lineage": self.lineage,
            "fingerprint": self.fingerprint,
        }

    @staticmethod
    def from_json(obj: dict) -> "StageInputs":
        return StageInputs(obj["config"], obj["upstream"], tuple(tuple(i) for i in obj["items"]))


def items_of(ids: Sequence[int], contents: Sequence[Any]) -> tuple[tuple[int, str], ...]:
    """(id, short content hash) per item, in order."""
    return tuple((int(i), digest(c)[:16]) for i, c in zip(ids, contents, strict=True))


def without_legacy(settings: dict, legacy: Mapping[str, Any], together: Sequence[str] = ()) -> dict:
    """A stage's settings with the ones added after work directories existed left out while
    they keep the behaviour from before, so those directories keep their identity.

    `legacy` maps each added setting (a dotted path into the nested dicts) to the value that
    reproduces the earlier behaviour. When every one holds its legacy value, they and the
    `together` paths (settings that only mean something beside them) are dropped. Values compare
    in JSON form (a tuple equals a list, 0 equals 0.0). `settings` itself is not changed.
    """

    def plain(value: Any) -> Any:
        return json.loads(json.dumps(value, default=_json))

    out = copy.deepcopy(settings)
    if any(plain(_at(out, path)) != plain(value) for path, value in legacy.items()):
        return out
    for path in (*legacy, *together):
        parent, _, leaf = path.rpartition(".")
        del _at(out, parent)[leaf]
    return out


def _at(settings: dict, path: str) -> Any:
    """The value at a dotted path ("" is `settings` itself)."""
    for key in filter(None, path.split(".")):
        settings = settings[key]
    return settings


class StageInputsChanged(RuntimeError):
    """A stage's recorded inputs differ from this run's in a way it cannot extend."""


@dataclasses.dataclass(frozen=True)
class StageRecord:
    """The stage.json of one stage directory: its inputs, whether it finished, its summary."""

    stage: str
    inputs: StageInputs
    finished: bool = False
    summary: dict = dataclasses.field(default_factory=dict)
    wall_s: float | None = None  # how long the finishing run of the stage took

    @staticmethod
    def read(stage_dir: str | Path) -> "StageRecord | None":
        path = Path(stage_dir) / RECORD
        if not path.is_file():
            return None
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
            return StageRecord(
                obj["stage"],
                StageInputs.from_json(obj["inputs"]),
                obj["finished"],
                obj["summary"],
                obj.get("wall_s"),
            )
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise StageInputsChanged(
                f"{path}: unreadable stage record ({type(err).__name__}: {err}); delete the "
                "stage directory to redo the stage"
            ) from None

    def write(self, stage_dir: str | Path) -> None:
        write_json_atomic(
            Path(stage_dir) / RECORD,
            {
                "stage": self.stage,
                "finished": self.finished,
                "summary": self.summary,
                "wall_s": self.wall_s,
                "inputs": self.inputs.to_json(),
            },
        )


def _changes(old: StageInputs, new: StageInputs) -> list[str]:
    """Human-readable differences between two input sets."""
    out = []
    for key in sorted(set(old.config) | set(new.config)):
        if old.config.get(key) != new.config.get(key):
            out.append(f"setting {key}: {old.config.get(key)!r} -> {new.config.get(key)!r}")
    for key in sorted(set(old.upstream) | set(new.upstream)):
        if old.upstream.get(key) != new.upstream.get(key):
            out.append(f"upstream {key} changed")
    if old.items != new.items:
        old_map, new_map = dict(old.items), dict(new.items)
        removed = [i for i in old_map if i not in new_map]
        edited = [i for i in old_map if i in new_map and old_map[i] != new_map[i]]
        added = [i for i in new_map if i not in old_map]
        if removed:
            out.append(f"{len(removed)} edit(s) removed (ids {removed[:5]})")
        if edited:
            out.append(f"{len(edited)} edit(s) with changed text (ids {edited[:5]})")
        if added:
            out.append(f"{len(added)} edit(s) added")
        if not (removed or edited or added):
            out.append("the edits' order changed")
    return out


def decide(stage: str, stage_dir: str | Path, new: StageInputs, retrain: bool = False) -> Verdict:
    """The verdict for `stage` given its record in `stage_dir` (see the module docstring)."""
    record = StageRecord.read(stage_dir)
    if record is None or retrain:
        return "fresh"
    old = record.inputs
    if old.fingerprint == new.fingerprint:
        return "skip" if record.finished else "resume"
    changes = _changes(old, new)
    old_items = dict(old.items)
    superset = all(dict(new.items).get(i) == h for i, h in old.items) and len(new.items) > len(
        old_items
    )
    if record.finished and old.lineage == new.lineage and superset:
        return "extend"
    why = "; ".join(changes) or "its inputs changed"
    if not record.finished and superset and old.lineage == new.lineage:
        why += " (the earlier run did not finish, so it cannot be extended)"
    raise StageInputsChanged(
        f"stage {stage!r} in {stage_dir} was trained on other inputs: {why}. Either use a fresh "
        f"work directory, or retrain this stage with --config.{stage}.retrain=True."
    )
