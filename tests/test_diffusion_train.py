"""Training the generator: memorisation, sharded-step parity, checkpoint resume, bank checks."""

import json

import jax
import numpy as np
import pytest
from conftest import run_with_fake_devices

from meg_jax.diffusion import (
    generate,
    generator_config,
    l2_criterion,
    load_generator,
    train_generator,
)
from meg_jax.diffusion.bank import batch_rows, padded_batch_size, prepare_bank


def _synthetic_bank(rows=256, length=96, width=16, seed=0):
    """Random conditions and neuron-like targets that are a smooth function of them.

    Each row's raw L2 norm is about 1.8, so the stopping threshold 0.5 needs the generator to
    use the condition: predicting the bank mean leaves an L2 of about 1.8 per row.
    """
    rng = np.random.default_rng(seed)
    cond = rng.normal(size=(rows, width)).astype(np.float32)
    mixing = rng.normal(size=(width, length)) / np.sqrt(width)
    unit = cond / np.linalg.norm(cond, axis=1, keepdims=True) * np.sqrt(width)
    weights = (0.3 * np.tanh(unit @ mixing)).astype(np.float32)
    return weights, cond


MEMORISE = {
    "dit": {"cond_dropout": 0.0},
    "optim": {"learning_rate": 1e-2, "warmup_steps": 50},
    "train": {
        "num_steps": 800,
        "ema_decay": 0.0,
        "eval_every": 50,
        "log_every": 25,
        "checkpoint_every": 25,
    },
}


class Crash(Exception):
    """Stands in for the process being killed."""


def test_tiny_dit_memorises_a_synthetic_bank_and_resumes_identically(tmp_path):
    weights, cond = _synthetic_bank()
    assert l2_criterion(np.broadcast_to(weights.mean(0), weights.shape), weights)["criterion"] > 1.5
    # A failed fit (NaN row) is dropped, not trained on.
    weights_nan = np.concatenate([weights, np.full((1, weights.shape[1]), np.nan, np.float32)])
    cond_nan = np.concatenate([cond, cond[:1]])
    config = generator_config(MEMORISE, preset="fast", dit_preset="tiny")
    result = train_generator(weights_nan, cond_nan, config, tmp_path / "whole")

    assert result.stopped and result.criterion < 0.5 and result.step < 800
    # The sampler the criterion used is recorded, and the JSONL log has every evaluation.
    events = _events(tmp_path / "whole")
    criteria = [e for e in events if e["event"] == "criterion"]
    assert [e["step"] for e in criteria] == list(range(50, result.step + 1, 50))
    assert criteria[-1]["sampler"] == "ddim-50" and events[0]["rows"] == 256

    sampler = config.train.criterion_sampler
    rng = jax.random.key(7)
    a = np.asarray(generate(result.state, cond, rng, config, sampler))
    b = np.asarray(generate(result.state, cond, rng, config, sampler))
    np.testing.assert_array_equal(a, b)  # DDIM (eta 0) with a fixed seed is deterministic
    assert l2_criterion(a, weights)["criterion"] < 0.6
    # It really uses the condition: a shuffled pairing is far off.
    shuffled = np.asarray(generate(result.state, cond[::-1], rng, config, sampler))
    assert l2_criterion(shuffled, weights)["criterion"] > 3 * l2_criterion(a, weights)["criterion"]
    # The saved run reloads for inference and samples the same weights.
    params, loaded_config = load_generator(tmp_path / "whole")
    assert loaded_config == config
    np.testing.assert_allclose(generate(params, cond, rng, config, sampler), a, atol=1e-5)

    # Kill a second run at its step-50 evaluation (last checkpoint: step 25), then resume it:
    # it must end exactly where the uninterrupted run did.
    def crash(step, state, samples, record):
        raise Crash

    with pytest.raises(Crash):
        train_generator(weights_nan, cond_nan, config, tmp_path / "crashed", callback=crash)
    resumed = train_generator(weights_nan, cond_nan, config, tmp_path / "crashed")
    assert resumed.stopped and resumed.step == result.step
    for got, want in zip(
        jax.tree.leaves(resumed.state), jax.tree.leaves(result.state), strict=True
    ):
        np.testing.assert_array_equal(got, want)
    starts = [e for e in _events(tmp_path / "crashed") if e["event"] == "start"]
    assert [(e["step"], e["resumed"]) for e in starts] == [(0, False), (25, True)]
    # Other data cannot silently resume this run.
    with pytest.raises(ValueError, match="trained on other data"):
        train_generator(weights * 2, cond, config, tmp_path / "crashed")


def _events(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_sharded_step_equals_single_device_step():
    # The reference recipe (hybrid loss); 60 rows are padded to 64 on 8 devices and stay 60 on
    # one, so this also checks that padding rows are masked out of the loss and the draws.
    out = run_with_fake_devices(
        """
        import jax, numpy as np
        from meg_jax.diffusion import generator_config
        from meg_jax.diffusion.normalization import fit_normalization, normalize
        from meg_jax.diffusion.train_step import init_state, make_train_step
        from meg_jax.infra.sharding import make_mesh, replicated

        assert jax.device_count() == 8
        rng = np.random.default_rng(0)
        eight, one = make_mesh(8, 1), make_mesh(1, 1, jax.devices()[:1])
        config = generator_config(
            {"dit": {"cond_dropout": 0.0}, "optim": {"learning_rate": 1e-3}},
            preset="reference",
            dit_preset="tiny",
        )
        rows = 60
        weights = rng.normal(size=(rows, 50)).astype(np.float32) * 0.1
        cond = rng.normal(size=(rows, 12)).astype(np.float32)
        norm = fit_normalization(config.normalization, weights, cond)
        x0 = np.asarray(normalize(norm, weights))
        # A host copy: each run's first step donates (deletes) the device state it is given.
        initial = jax.tree.map(np.asarray, init_state(config, norm, 12, jax.random.key(0), one))
        start = initial.params
        finals = []
        for mesh, pad in ((one, 0), (eight, 4)):
            xb, cb = (np.pad(a, ((0, pad), (0, 0))) for a in (x0, cond))
            mask = np.pad(np.ones(rows, np.float32), (0, pad))
            state = jax.device_put(initial, replicated(mesh))
            step = make_train_step(config, mesh)
            trace = []
            for _ in range(3):
                state, metrics = step(state, xb, cb, mask, jax.random.key(1))
                trace.append([float(metrics["loss"]), float(metrics["grad_norm"])])
            specs = {leaf.sharding.spec for leaf in jax.tree.leaves(state.params)}
            assert specs == {jax.sharding.PartitionSpec()}, specs
            finals.append((jax.tree.map(np.asarray, state.params), np.asarray(trace)))
        (a, trace_a), (b, trace_b) = finals
        leaves = list(zip(jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(start)))
        diff = max(float(np.abs(x - y).max()) for x, y, _ in leaves)
        moved = max(float(np.abs(x - s).max()) for x, _, s in leaves)
        print(diff, moved, trace_a.tolist(), trace_b.tolist())
        # Losses and gradient norms agree to float rounding at every step; parameters to a few
        # percent of how far they moved, since Adam's first steps are ~lr * sign(g) and flip
        # sign on near-zero gradients whose reduction order differs across devices.
        np.testing.assert_allclose(trace_a, trace_b, rtol=1e-5)
        assert moved > 1e-3 and diff < 0.05 * moved, (diff, moved)
        """
    )
    assert len(out.splitlines()) == 1


def test_bank_preparation_and_batch_order():
    weights = np.arange(12, dtype=np.float32).reshape(4, 3)
    weights[1, 2] = np.nan
    cond = np.ones((4, 2), np.float32)
    bank = prepare_bank(weights, cond, success=np.array([True, True, True, False]))
    np.testing.assert_array_equal(bank.rows, [0, 2])
    with pytest.raises(ValueError, match="'weights' has 4 rows but 'conditions' has 3"):
        prepare_bank(weights, cond[:3], source="bank.npz")
    cond[2, 0] = np.inf
    with pytest.raises(ValueError, match="bank.npz: record 2: field 'conditions'"):
        prepare_bank(weights, cond, source="bank.npz")
    with pytest.raises(ValueError, match="no usable rows"):
        prepare_bank(weights, np.ones((4, 2)), success=np.zeros(4, bool))

    assert padded_batch_size(255, 0, 8) == 256 and padded_batch_size(255, 100, 1) == 100
    rows, mask = batch_rows(10, 4, 4, step=2, shuffle=False, seed=0)  # third batch: 2 rows
    np.testing.assert_array_equal(rows, [8, 9, 0, 0])
    np.testing.assert_array_equal(mask, [1, 1, 0, 0])
    seen = np.concatenate([batch_rows(10, 4, 4, s, True, 3)[0][:4] for s in range(3)])[:10]
    assert sorted(seen) == list(range(10))  # a shuffled epoch covers every row once
    again = batch_rows(10, 4, 4, 1, True, 3)
    np.testing.assert_array_equal(again[0], batch_rows(10, 4, 4, 1, True, 3)[0])


def test_condition_noise_gives_a_neighbourhood_of_each_condition_its_neuron(tmp_path):
    """Trained on exact conditions, the generator drifts off at a nearby condition (a
    paraphrase); trained with condition noise it gives the nearby condition the same neuron."""
    rng = np.random.default_rng(1)
    rows, length, width = 16, 96, 16
    cond = rng.normal(size=(rows, width)).astype(np.float32)
    weights = (0.3 * np.tanh(rng.normal(size=(rows, length)))).astype(np.float32)  # no pattern
    unit = cond / np.linalg.norm(cond, axis=1, keepdims=True)
    step = rng.normal(size=cond.shape)
    step *= 0.3 / np.linalg.norm(step, axis=1, keepdims=True)
    nearby = (unit + step).astype(np.float32)  # 0.3 away; the rows are about 1.4 apart
    sampler = {"kind": "ddim", "steps": 20}
    errors = {}
    for noise in (0.0, 0.5):
        overrides = {
            "dit": {"cond_dropout": 0.0, "cond_noise": noise},
            "optim": {"learning_rate": 1e-2, "warmup_steps": 50},
            "train": {
                "num_steps": 400,
                "ema_decay": 0.0,
                "eval_every": 400,
                "log_every": 400,
                "checkpoint_every": 400,
                "stop_threshold": 0.0,
                "criterion_sampler": sampler,
            },
            "sampler": sampler,
        }
        config = generator_config(overrides, preset="fast", dit_preset="tiny")
        state = train_generator(weights, cond, config, tmp_path / str(noise)).state
        at = {
            name: l2_criterion(np.asarray(generate(state, c, jax.random.key(0), config)), weights)
            for name, c in (("exact", cond), ("nearby", nearby))
        }
        errors[noise] = {name: record["l2_mean"] for name, record in at.items()}
    print(errors)
    assert errors[0.5]["exact"] < 0.5 and errors[0.0]["exact"] < 0.5  # both memorise the bank
    assert errors[0.5]["nearby"] < 0.5 * errors[0.0]["nearby"]
