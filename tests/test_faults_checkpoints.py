"""Checkpoint restore survives a damaged latest step and cleans up after crashes (issue 15, 6).

Before: a damaged latest step was a long orbax/tensorstore traceback while an intact earlier
step sat beside it unused, and `*.orbax-checkpoint-tmp-*` folders of interrupted saves stayed
forever.
"""

import gc
import logging
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meg_jax.infra.runs import RestoreError, checkpoint_manager, restore_or, save

# Reading garbled files leaves tensorstore futures unawaited; the warnings are noise here.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(autouse=True)
def _collect_unawaited_reads():
    """The unawaited reads are freed after each test of this file, where the filter above
    applies: left to the collector, they surfaced as the warning in whichever test of another
    file ran next on the worker."""
    yield
    gc.collect()


STATE = {"a": jnp.arange(4.0), "b": {"c": jnp.ones((2, 3))}}


def _saved(workdir: Path, steps=(1, 2, 3)):
    manager = checkpoint_manager(workdir, max_to_keep=5)
    for step in steps:
        save(manager, step, jax.tree.map(lambda x, s=step: x * s, STATE))
    return manager


def _garble(step_dir: Path) -> None:
    """Overwrites every array data file of a step, as a crash mid-write or a bad disk would."""
    files = [p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files, f"no data files under {step_dir}"
    for path in files:
        path.write_bytes(b"\0" * 7)


def test_damaged_latest_step_falls_back_and_says_so(tmp_path, caplog):
    _saved(tmp_path)
    _garble(tmp_path / "checkpoints" / "3")
    manager = checkpoint_manager(tmp_path, max_to_keep=5)
    with caplog.at_level(logging.WARNING, logger="meg_jax.infra.runs"):
        state, resumed = restore_or(manager, STATE)
    assert resumed
    np.testing.assert_array_equal(state["a"], np.arange(4.0) * 2)  # step 2's values
    warning = "\n".join(r.getMessage() for r in caplog.records)
    assert "step(s) [3] could not be read" in warning and "resuming from step 2" in warning
    assert str(tmp_path / "checkpoints") in warning
    # The damaged step is kept aside, out of orbax's sight, so step 3 can be saved afresh.
    assert (tmp_path / "checkpoints.damaged" / "3").is_dir()
    assert manager.all_steps() == [1, 2]
    save(manager, 3, jax.tree.map(lambda x: x * 30, STATE))
    again, _ = restore_or(checkpoint_manager(tmp_path, max_to_keep=5), STATE)
    np.testing.assert_array_equal(again["a"], np.arange(4.0) * 30)


def test_two_damaged_steps_fall_back_to_the_oldest(tmp_path, caplog):
    _saved(tmp_path)
    _garble(tmp_path / "checkpoints" / "3")
    shutil.rmtree(tmp_path / "checkpoints" / "2" / "default")
    with caplog.at_level(logging.WARNING, logger="meg_jax.infra.runs"):
        state, _ = restore_or(checkpoint_manager(tmp_path, max_to_keep=5), STATE)
    np.testing.assert_array_equal(state["a"], np.arange(4.0))
    assert "step(s) [3, 2] could not be read" in caplog.text


def test_no_readable_step_is_a_clear_error_and_moves_nothing(tmp_path):
    _saved(tmp_path, steps=(1, 2))
    for step in (1, 2):
        _garble(tmp_path / "checkpoints" / str(step))
    with pytest.raises(RestoreError) as info:
        restore_or(checkpoint_manager(tmp_path), STATE)
    message = str(info.value)
    assert str(tmp_path / "checkpoints") in message and "[2, 1]" in message
    assert "use a fresh workdir" in message and "delete" in message
    assert not (tmp_path / "checkpoints.damaged").exists()


def test_changed_structure_is_not_mistaken_for_damage(tmp_path):
    _saved(tmp_path, steps=(1, 2))
    other = {"a": jnp.arange(5.0), "b": {"c": jnp.ones((2, 3))}}
    with pytest.raises(RestoreError, match="use a fresh workdir"):
        restore_or(checkpoint_manager(tmp_path), other)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]


def test_unfinished_saves_are_removed_when_the_manager_opens(tmp_path, caplog):
    _saved(tmp_path, steps=(1,))
    root = tmp_path / "checkpoints"
    partial = root / "2.orbax-checkpoint-tmp-1700000000"
    shutil.copytree(root / "1", partial)
    (root / "3.orbax-checkpoint-tmp-1700000001").write_text("half")
    with caplog.at_level(logging.WARNING, logger="meg_jax.infra.runs"):
        manager = checkpoint_manager(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["1"]
    assert "2.orbax-checkpoint-tmp-1700000000: removing an unfinished" in caplog.text
    state, resumed = restore_or(manager, STATE)
    assert resumed
    np.testing.assert_array_equal(state["a"], np.arange(4.0))
