"""Schedule, parameterisation, normalisation and config checks of the weight generator."""

import ml_collections
import numpy as np
import pytest

from meg_jax.diffusion import GeneratorConfig, generator_config
from meg_jax.diffusion.config import DiffusionConfig, NormalizationConfig
from meg_jax.diffusion.normalization import (
    center_conditions,
    denormalize,
    fit_normalization,
    normalize,
)
from meg_jax.diffusion.parameterization import (
    eps_from_v,
    eps_from_x0,
    predicted_eps,
    predicted_x0,
    training_target,
    v_from_x0_eps,
    x0_from_eps,
    x0_from_v,
)
from meg_jax.diffusion.process import q_sample
from meg_jax.diffusion.schedule import make_schedule, respaced_timesteps

CFG = DiffusionConfig()


def test_full_schedule_matches_ho_et_al_linear_betas():
    sched = make_schedule(CFG)
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - betas)
    np.testing.assert_allclose(sched.betas, betas, rtol=1e-6)
    np.testing.assert_allclose(sched.alphas_cumprod, abar, rtol=1e-5)
    np.testing.assert_array_equal(sched.timesteps, np.arange(1000))
    # alpha_t^2 + sigma_t^2 = 1 at every step.
    total = np.square(sched.sqrt_alphas_cumprod) + np.square(sched.sqrt_one_minus_alphas_cumprod)
    np.testing.assert_allclose(total, 1.0, atol=1e-6)
    # Posterior variance beta tilde_t = beta_t (1 - abar_{t-1}) / (1 - abar_t); 0 at t = 0.
    abar_prev = np.append(1.0, abar[:-1])
    np.testing.assert_allclose(
        sched.posterior_variance, betas * (1 - abar_prev) / (1 - abar), rtol=1e-5, atol=1e-30
    )
    assert sched.posterior_variance[0] == 0
    assert np.isfinite(sched.posterior_log_variance_clipped).all()


@pytest.mark.parametrize("steps", [2, 10, 50, 999])
def test_respaced_schedule_keeps_the_full_marginals(steps):
    full = make_schedule(CFG)
    sched = make_schedule(CFG, steps)
    kept = np.asarray(sched.timesteps)
    assert len(kept) == steps and kept[0] == 0 and kept[-1] == 999
    assert np.all(np.diff(kept) > 0)
    np.testing.assert_allclose(sched.alphas_cumprod, np.asarray(full.alphas_cumprod)[kept], 1e-5)
    # Its betas chain back to the same alphas_cumprod, and its posterior is the respaced one.
    np.testing.assert_allclose(
        np.cumprod(1 - np.asarray(sched.betas, np.float64)),
        sched.alphas_cumprod,
        rtol=1e-4,
        atol=1e-7,
    )
    np.testing.assert_allclose(sched.alphas_cumprod_prev[1:], sched.alphas_cumprod[:-1])


def test_respacing_is_round_of_even_stride_like_the_reference():
    # IDDPM's space_timesteps(1000, "50") walks a float stride of 999/49 and rounds.
    stride, cur, expected = 999 / 49, 0.0, []
    for _ in range(50):
        expected.append(round(cur))
        cur += stride
    np.testing.assert_array_equal(respaced_timesteps(1000, 50), expected)
    with pytest.raises(ValueError, match="steps"):
        respaced_timesteps(1000, 1)


def test_parameterisation_round_trips():
    rng = np.random.default_rng(0)
    sched = make_schedule(CFG)
    k = rng.integers(0, 1000, size=8)
    alpha = np.asarray(sched.sqrt_alphas_cumprod)[k][:, None]
    sigma = np.asarray(sched.sqrt_one_minus_alphas_cumprod)[k][:, None]
    x0, eps = rng.normal(size=(2, 8, 12)).astype(np.float32)
    x_t = np.asarray(q_sample(sched, x0, k, eps))
    np.testing.assert_allclose(x_t, alpha * x0 + sigma * eps, rtol=1e-5, atol=1e-6)
    v = v_from_x0_eps(x0, eps, alpha, sigma)
    # The reference's own target: (alpha x_t - x0) / sigma.
    np.testing.assert_allclose(v, (alpha * x_t - x0) / sigma, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(x0_from_v(x_t, v, alpha, sigma), x0, atol=1e-5)
    np.testing.assert_allclose(eps_from_v(x_t, v, alpha, sigma), eps, atol=1e-5)
    np.testing.assert_allclose(eps_from_x0(x_t, x0, alpha, sigma), eps, atol=1e-2)
    np.testing.assert_allclose(x0_from_eps(x_t, eps, alpha, sigma), x0, rtol=1e-3, atol=1e-2)
    for kind in ("v", "eps", "x0"):
        out = training_target(kind, x0, eps, alpha, sigma)
        np.testing.assert_allclose(predicted_x0(kind, out, x_t, alpha, sigma), x0, atol=2e-2)
        np.testing.assert_allclose(predicted_eps(kind, out, x_t, alpha, sigma), eps, atol=2e-2)
    with pytest.raises(ValueError, match="prediction"):
        training_target("score", x0, eps, alpha, sigma)


def test_normalizations_invert_and_standardise():
    rng = np.random.default_rng(1)
    init = rng.normal(size=20).astype(np.float32)
    weights = (init + rng.normal(size=(50, 20)) * np.linspace(0.01, 1, 20)).astype(np.float32)
    weights[:, 3] = 0.7  # a constant dimension: the std floor keeps it finite
    cond = (rng.normal(size=(50, 6)) + 4.0).astype(np.float32)
    for cfg in (
        NormalizationConfig(),
        NormalizationConfig(kind="standardize"),
        NormalizationConfig(kind="standardize", center="init"),
    ):
        stats = fit_normalization(cfg, weights, cond, init)
        x0 = np.asarray(normalize(stats, weights))
        assert np.isfinite(x0).all()
        np.testing.assert_allclose(denormalize(stats, x0), weights, atol=1e-5)
    ref = fit_normalization(NormalizationConfig(), weights, cond)
    np.testing.assert_allclose(normalize(ref, weights), weights / 0.01, rtol=1e-6)
    std = fit_normalization(NormalizationConfig(kind="standardize"), weights, cond)
    x0 = np.asarray(normalize(std, weights))
    varying = np.arange(20) != 3
    np.testing.assert_allclose(x0.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(x0[:, varying].std(0), 1, rtol=1e-4)
    centred = fit_normalization(
        NormalizationConfig(kind="standardize", center="init"), weights, cond, init
    )
    np.testing.assert_allclose(normalize(centred, init[None]), 0, atol=1e-6)
    with pytest.raises(ValueError, match="center='init' needs"):
        fit_normalization(NormalizationConfig(kind="standardize", center="init"), weights, cond)
    # Conditions are left alone by default and centred on the bank mean on request.
    np.testing.assert_array_equal(center_conditions(ref, cond), cond)
    cond_stats = fit_normalization(NormalizationConfig(center_conditions=True), weights, cond)
    np.testing.assert_allclose(center_conditions(cond_stats, cond).mean(0), 0, atol=1e-5)
    with pytest.raises(ValueError, match=r"conditions must be \[50, E\]"):
        fit_normalization(NormalizationConfig(), weights, cond[:10])
    weights[4, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fit_normalization(NormalizationConfig(), weights, cond)


def test_config_presets_and_errors():
    assert generator_config() == GeneratorConfig()
    fast = generator_config(preset="fast", dit_preset="tiny")
    assert fast.normalization.kind == "standardize" and fast.dit.hidden == 64
    overrides = ml_collections.ConfigDict({"optim": {"learning_rate": 3e-4}})
    cfg = generator_config(overrides, preset="fast")
    assert cfg.optim.learning_rate == 3e-4 and cfg.optim.schedule == "cosine"
    with pytest.raises(
        ValueError, match=r"generator\.optim: unknown config key\(s\) \['lerning_rate'\]"
    ):
        generator_config({"optim": {"lerning_rate": 1.0}})
    with pytest.raises(ValueError, match=r"generator: unknown config key\(s\) \['dif'\]"):
        generator_config({"dif": {}})
    with pytest.raises(ValueError, match="unknown preset"):
        generator_config(preset="best")
    with pytest.raises(ValueError, match="hidden 30 is not divisible by heads 4"):
        generator_config({"dit": {"hidden": 30, "heads": 4}})
    with pytest.raises(ValueError, match="sampler.kind"):
        generator_config({"sampler": {"kind": "euler"}})


def test_normalization_statistics_in_row_blocks_equal_whole_bank_numpy(monkeypatch):
    """Blocks of 7 rows (a ragged last block) give numpy's statistics of the whole bank."""
    import meg_jax.diffusion.normalization as normalization

    monkeypatch.setattr(normalization, "ROW_CHUNK", 7)
    rng = np.random.default_rng(3)
    weights = (rng.normal(size=(50, 12)) * np.linspace(0.1, 2.0, 12) + 0.5).astype(np.float32)
    cond = rng.normal(size=(50, 4)).astype(np.float32)
    init = rng.normal(size=12).astype(np.float32)
    w = weights.astype(np.float64)
    cases = {
        (False, "mean"): (w.mean(0), np.sqrt(np.mean((w - w.mean(0)) ** 2))),
        (False, "init"): (init, np.sqrt(np.mean((w - init) ** 2))),
        (True, "mean"): (w.mean(0), w.std(0)),
        (True, "init"): (init, w.std(0)),
    }
    for (per_dimension, center), (want_center, want_scale) in cases.items():
        cfg = NormalizationConfig(kind="standardize", center=center, per_dimension=per_dimension)
        stats = fit_normalization(cfg, weights, cond, init)
        np.testing.assert_allclose(stats.center, want_center, rtol=1e-6)
        np.testing.assert_allclose(stats.scale, np.broadcast_to(want_scale, 12), rtol=1e-6)
    weights[45, 3] = np.inf  # in the last, ragged block
    with pytest.raises(ValueError, match="NaN or inf"):
        fit_normalization(NormalizationConfig(), weights, cond)
