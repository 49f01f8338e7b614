"""The L2 floor a DiT head of width D sets under a bank whose patches (S > D values) span more."""

import json
import logging

import jax.numpy as jnp
import numpy as np

from meg_jax.diffusion import generator_config, train_generator
from meg_jax.diffusion.capacity import head_floor
from meg_jax.diffusion.normalization import NormStats

PATCH, HIDDEN, TOKENS = 8, 5, 3


def _bank_with_known_floor(rows=40, seed=0):
    """Raw rows [N, T * S] whose pooled patches are a mean plus D large orthogonal components
    plus S - D small ones: the head reaches the large part, the small part is the floor.

    Returns (stats, raw weights, each row's floor computed by hand).
    """
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(PATCH, PATCH)))  # [S, S] orthonormal directions
    # Pooled coefficients [N * T, S]: zero-mean, mutually orthogonal columns (QR of centred
    # columns: each column of Q combines centred columns), so the pooled covariance is diagonal
    # in `basis` with these descending variances.
    centred = rng.normal(size=(rows * TOKENS, PATCH))
    coefficients, _ = np.linalg.qr(centred - centred.mean(axis=0))
    sizes = np.array([50.0, 40.0, 30.0, 20.0, 10.0, 0.3, 0.2, 0.1])
    patches = 0.7 + (coefficients * sizes) @ basis.T  # [N * T, S] in x0 space
    scale = rng.uniform(0.5, 2.0, size=PATCH * TOKENS)
    stats = NormStats(
        jnp.zeros(PATCH * TOKENS), jnp.asarray(scale, jnp.float32), jnp.zeros(4, jnp.float32)
    )
    x0 = patches.reshape(rows, TOKENS * PATCH)
    small = ((coefficients[:, HIDDEN:] * sizes[HIDDEN:]) @ basis[:, HIDDEN:].T).reshape(rows, -1)
    return stats, (x0 * scale).astype(np.float32), np.linalg.norm(small * scale, axis=1)


def test_floor_is_the_part_outside_the_heads_directions():
    stats, weights, by_hand = _bank_with_known_floor()
    floor = head_floor(stats, weights, PATCH, HIDDEN)
    np.testing.assert_allclose(floor, by_hand, rtol=1e-3, atol=1e-5)
    assert floor.min() > 0
    # A wider head, or a patch no longer than the width, reaches everything.
    assert np.all(head_floor(stats, weights, PATCH, PATCH) == 0.0)
    assert np.all(head_floor(stats, weights, HIDDEN, HIDDEN) == 0.0)
    # A narrower head misses more.
    assert np.all(head_floor(stats, weights, PATCH, HIDDEN - 2) > floor)


def test_a_run_that_cannot_reach_the_threshold_says_so(tmp_path, caplog):
    rng = np.random.default_rng(1)
    # 256 rows of one 96-value patch each span all 96 directions; a head of width 64 lacks 32.
    weights = rng.normal(size=(256, 96)).astype(np.float32)
    conditions = rng.normal(size=(256, 16)).astype(np.float32)
    train = {
        "num_steps": 1,
        "checkpoint_every": 1,
        "log_every": 1,
        "criterion_sampler": {"kind": "ddim", "steps": 2},
    }
    narrow = generator_config(
        {"dit": {"patch_size": 96, "hidden": 64}, "train": train}, dit_preset="tiny"
    )
    with caplog.at_level(logging.WARNING, logger="meg_jax.diffusion.train"):
        train_generator(weights, conditions, narrow, tmp_path / "narrow")
    assert "set dit.patch_size <= dit.hidden" in caplog.text
    start = json.loads((tmp_path / "narrow" / "metrics.jsonl").read_text().splitlines()[0])
    assert start["event"] == "start" and start["head_floor"] > 0.5
