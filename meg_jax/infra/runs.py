"""Training-run plumbing shared by the encoder and router stages: checkpoints and metric logs.

A run lives in one work directory:
    <workdir>/checkpoints/<step>/   orbax checkpoints of the whole train state (resume point)
    <workdir>/metrics.jsonl         one JSON object per logged event, appended and flushed

Resuming restores the latest checkpoint into the structure of a freshly initialised state, so a
state whose shapes changed (another model, another config) fails loudly instead of loading.
Metric lines written after the last checkpoint of an interrupted run are kept; a resumed run
logs those steps again, so readers should take the last line per step.
"""

import json
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class JsonlLog:
    """Appends one JSON object per call to `path` (flushed, so a crash loses at most a line)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record: Any) -> None:
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=_to_json) + "\n")


def _to_json(value: Any) -> Any:
    if isinstance(value, np.generic | np.ndarray | jax.Array):
        return np.asarray(value).tolist()
    raise TypeError(f"cannot log {type(value).__name__} as JSON")


def checkpoint_manager(workdir: str | Path, max_to_keep: int = 2) -> ocp.CheckpointManager:
    """An orbax manager for `<workdir>/checkpoints` keeping the newest `max_to_keep` steps."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
    )
    return ocp.CheckpointManager(Path(workdir).resolve() / "checkpoints", options=options)


def restore_or(manager: ocp.CheckpointManager, initial_state: Any) -> tuple[Any, bool]:
    """(the latest saved state, True), or (`initial_state`, False) when nothing is saved.

    `initial_state` is also the restore target: its structure, shapes, dtypes and shardings are
    what the saved arrays are read into.
    """
    step = manager.latest_step()
    if step is None:
        return initial_state, False
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, initial_state)
    restored = manager.restore(step, args=ocp.args.StandardRestore(target))
    return restored, True


def save(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
    """Saves `state` as `step` (a no-op if that step is already saved, e.g. right after resume)."""
    if step in manager.all_steps():
        return
    manager.save(step, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
