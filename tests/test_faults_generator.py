"""A diverging generator stops with a clear error and keeps its last finite checkpoint (issue 15,
finding 2).

Before: with a NaN loss by step 100 the stopping criterion was NaN (never below the threshold,
never noticed), NaN checkpoints were saved, and the run exited 0 with every prediction empty.
Divergence is provoked deterministically by wrapping the real train step.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import meg_jax.diffusion.train as train_module
from meg_jax.diffusion import generator_config, load_generator, train_generator
from meg_jax.diffusion.train import NonFiniteTrainingError

# One config for every test: the train step compiles once.
TRAIN = {
    "num_steps": 40,
    "eval_every": 1000,
    "log_every": 10,
    "checkpoint_every": 5,
    "max_to_keep": 10,
}
CONFIG = generator_config({"train": TRAIN}, preset="fast", dit_preset="tiny")


def _bank(rows=16, length=64, width=8):
    rng = np.random.default_rng(0)
    return (
        (0.1 * rng.normal(size=(rows, length))).astype(np.float32),
        rng.normal(size=(rows, width)).astype(np.float32),
    )


def _diverging_step(monkeypatch, at: int, what: str):
    """Wraps the real train step: from step `at` on, the params (or only the loss) become NaN."""
    real = train_module.make_train_step

    def make(config, mesh):
        step_fn = real(config, mesh)

        def wrapped(state, *args):
            state, metrics = step_fn(state, *args)
            if int(state.step) >= at:
                if what == "params":
                    poisoned = jax.tree.map(lambda x: x * jnp.nan, state.params)
                    state = state.replace(params=poisoned)
                metrics = {**metrics, "loss": metrics["loss"] * jnp.nan}
            return state, metrics

        return wrapped

    monkeypatch.setattr(train_module, "make_train_step", make)


def _events(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "what, stop, kept",
    [
        # NaN parameters from step 12: caught before the save at 15, not at the log step 20.
        ("params", "diverged at step 15 (parameters", 10),
        # A NaN loss with finite parameters (saving at 15 is still sound): caught at log step 20.
        ("loss", "diverged at step 20 (loss nan)", 15),
    ],
)
def test_divergence_stops_and_keeps_the_last_finite_checkpoint(
    tmp_path, monkeypatch, what, stop, kept
):
    _diverging_step(monkeypatch, at=12, what=what)
    weights, cond = _bank()
    with pytest.raises(NonFiniteTrainingError) as info:
        train_generator(weights, cond, CONFIG, tmp_path / "run")
    message = str(info.value)
    assert stop in message and "was not saved" in message
    assert f"last finite checkpoint is step {kept}" in message and "learning_rate" in message
    manager = train_module.checkpoint_manager(tmp_path / "run", 10)
    assert manager.all_steps() == list(range(5, kept + 1, 5))
    params, _ = load_generator(tmp_path / "run")
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params.params))
    last = _events(tmp_path / "run")[-1]
    assert last["event"] == "non_finite" and last["last_finite_step"] == kept


def _no_sampling(monkeypatch, value: float):
    """The criterion's samples replaced by a constant (no sampler to compile)."""

    def samples(state, conditions, *args, **kwargs):
        return jnp.full((len(conditions), 64), value)

    monkeypatch.setattr(train_module, "generate", samples)


def test_nan_criterion_never_passes_silently(tmp_path, monkeypatch):
    _no_sampling(monkeypatch, jnp.nan)
    weights, cond = _bank()
    # The criterion is evaluated at the last step (40); NaN must not be read as "not yet below".
    with pytest.raises(NonFiniteTrainingError, match=r"step 40 \(stopping criterion nan"):
        train_generator(weights, cond, CONFIG, tmp_path / "run")
    assert train_module.checkpoint_manager(tmp_path / "run", 10).all_steps()[-1] == 35


def test_resuming_from_a_non_finite_checkpoint_is_refused(tmp_path, monkeypatch):
    _no_sampling(monkeypatch, 0.0)
    weights, cond = _bank()
    state = train_generator(weights, cond, CONFIG, tmp_path / "run").state
    assert int(state.step) == 40
    # A run saved by older code, before these checks: its newest checkpoint is NaN.
    manager = train_module.checkpoint_manager(tmp_path / "run", 10)
    bad = state.replace(params=jax.tree.map(lambda x: x * jnp.nan, state.params))
    train_module.save(manager, 41, bad.replace(step=jnp.asarray(41, state.step.dtype)))
    longer = generator_config(
        {"train": {**TRAIN, "num_steps": 50}}, preset="fast", dit_preset="tiny"
    )
    with pytest.raises(NonFiniteTrainingError, match="checkpoint at step 41 holds NaN"):
        train_generator(weights, cond, longer, tmp_path / "run")
