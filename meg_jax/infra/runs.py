"""Training-run plumbing shared by the encoder and router stages: checkpoints and metric logs.

A run lives in one work directory:
    <workdir>/checkpoints/<step>/   orbax checkpoints of the whole train state (resume point)
    <workdir>/metrics.jsonl         one JSON object per logged event, appended and flushed

Resuming restores the latest checkpoint into the structure of a freshly initialised state, so a
state whose shapes changed (another model, another config) fails loudly instead of loading. A
latest step that cannot be read (damaged by a crash) falls back to the newest readable one, with
a warning; unfinished saves (`*.orbax-checkpoint-tmp-*`) are deleted when the manager opens.
Metric lines written after the last checkpoint of an interrupted run are kept; a resumed run
logs those steps again, so readers should take the last line per step.

Under several processes (`meg_jax.infra.distributed`) every process saves and restores (orbax's
saves are collective; it has process 0 write what all share), process 0 alone appends metric
lines and tidies the checkpoint folder, and the others wait for the tidying.
"""

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from meg_jax.infra.distributed import barrier, is_main_process

log = logging.getLogger(__name__)


class JsonlLog:
    """Appends one JSON object per call to `path` (flushed, so a crash loses at most a line)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record: Any) -> None:
        if not is_main_process():  # every process logs the same figures: one copy
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=_to_json) + "\n")


def _to_json(value: Any) -> Any:
    if isinstance(value, np.generic | np.ndarray | jax.Array):
        return np.asarray(value).tolist()
    raise TypeError(f"cannot log {type(value).__name__} as JSON")


# Orbax writes a step into `<step>.orbax-checkpoint-tmp-<time>` and renames it when complete; a
# crash mid-save leaves that folder behind, and orbax neither lists nor removes it.
_PARTIAL_SAVE = ".orbax-checkpoint-tmp"


class RestoreError(RuntimeError):
    """No saved step of a run could be read; the message names the folder and the ways out."""


def checkpoint_manager(workdir: str | Path, max_to_keep: int = 2) -> ocp.CheckpointManager:
    """An orbax manager for `<workdir>/checkpoints` keeping the newest `max_to_keep` steps.

    Partial saves left by a crash (`*.orbax-checkpoint-tmp-*`) are deleted first, with a warning:
    they are never a resume point, and they would otherwise pile up with every interrupted run.
    """
    directory = Path(workdir).resolve() / "checkpoints"
    barrier(f"before checkpoints {directory}")
    if is_main_process():
        _remove_partial_saves(directory)
    barrier(f"checkpoints {directory}")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
    )
    return ocp.CheckpointManager(directory, options=options)


def _remove_partial_saves(directory: Path) -> None:
    if not directory.is_dir():
        return
    for partial in sorted(directory.glob(f"*{_PARTIAL_SAVE}*")):
        log.warning(
            "%s: removing an unfinished checkpoint save left by an interrupted run", partial
        )
        if partial.is_dir() and not partial.is_symlink():
            shutil.rmtree(partial)
        else:
            partial.unlink()


def restore_or(manager: ocp.CheckpointManager, initial_state: Any) -> tuple[Any, bool]:
    """(the newest readable saved state, True), or (`initial_state`, False) when nothing is saved.

    `initial_state` is also the restore target: its structure, shapes, dtypes and shardings are
    what the saved arrays are read into.

    When the newest step cannot be read (a file cut short by a crash or a full disk), older steps
    are tried, newest first; the unreadable newer ones are moved aside to
    `<workdir>/checkpoints.damaged/<step>` (kept for inspection, out of orbax's sight, so that the
    resumed run saves those steps afresh) and a warning names them. When no step can be read,
    nothing is moved and `RestoreError` says what to do: a state whose shapes changed (another
    model or config) fails on every step, and must not be mistaken for damage.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        return initial_state, False
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, initial_state)
    failures: list[tuple[int, Exception]] = []
    for step in steps:
        try:
            restored = manager.restore(step, args=ocp.args.StandardRestore(target))
        except Exception as err:  # orbax and tensorstore raise many types on unreadable bytes
            failures.append((step, err))
            continue
        if failures:
            barrier(f"before moving aside {manager.directory}")  # every process has tried them
            if is_main_process():
                _move_aside(manager, [s for s, _ in failures], step, failures[0][1])
            barrier(f"moved aside {manager.directory}")
            manager.reload()
        return restored, True
    directory = Path(manager.directory)
    latest, err = failures[0]
    raise RestoreError(
        f"{directory}: none of the saved steps {steps} could be restored (step {latest}: "
        f"{type(err).__name__}: {_first_line(err)}). If the model, data or config changed since "
        f"they were saved, use a fresh workdir; if the files are damaged, delete {directory} to "
        "start this stage over"
    ) from err


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else "(no message)"


def _move_aside(manager: ocp.CheckpointManager, bad: list[int], good: int, err: Exception) -> None:
    directory = Path(manager.directory)
    aside = directory.parent / f"{directory.name}.damaged"
    aside.mkdir(exist_ok=True)
    for step in bad:
        source, destination = directory / str(step), aside / str(step)
        if not source.exists():
            continue
        if destination.exists():  # damaged twice at the same step: keep the newer copy
            shutil.rmtree(destination)
        shutil.move(str(source), str(destination))
    log.warning(
        "%s: checkpoint step(s) %s could not be read (%s: %s); resuming from step %d instead. "
        "The unreadable step(s) were moved to %s",
        directory,
        bad,
        type(err).__name__,
        _first_line(err),
        good,
        aside,
    )


def save(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
    """Saves `state` as `step` (a no-op if that step is already saved, e.g. right after resume)."""
    if step in manager.all_steps():
        return
    manager.save(step, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
