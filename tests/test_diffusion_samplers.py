"""Samplers against exact denoisers of Gaussian data, and `generate`'s chunk invariance."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meg_jax.diffusion import GeneratorParams, generate, generator_config
from meg_jax.diffusion.config import DiffusionConfig, SamplerConfig
from meg_jax.diffusion.dit import DiT1D
from meg_jax.diffusion.normalization import NormStats
from meg_jax.diffusion.parameterization import training_target
from meg_jax.diffusion.samplers import sample_loop
from meg_jax.diffusion.schedule import make_schedule

B, P = 256, 30
SPREAD = 0.5  # data: x0 ~ N(mu_i, SPREAD^2) independently per item i and dimension


def _gaussian_oracle(diffusion, mu, var_value=0.0):
    """The exact denoiser for Gaussian data, E[x0 | x_t] = mu + a s^2 / (a^2 s^2 + sigma^2)
    (x_t - a mu), expressed as the configured prediction (plus a constant variance channel)."""
    full = make_schedule(diffusion)

    def apply_fn(x_t, t, cond):
        alpha = full.sqrt_alphas_cumprod[t][:, None]
        sigma = full.sqrt_one_minus_alphas_cumprod[t][:, None]
        gain = alpha * SPREAD**2 / (alpha**2 * SPREAD**2 + sigma**2)
        x0 = mu + gain * (x_t - alpha * mu)
        eps = (x_t - alpha * x0) / sigma
        out = training_target(diffusion.prediction, x0, eps, alpha, sigma)[:, None]
        if diffusion.learn_variance:
            out = jnp.concatenate([out, jnp.full_like(out, var_value)], axis=1)
        return out

    return apply_fn


def _sample(diffusion, sampler, var_value=0.0):
    mu = jnp.asarray(np.random.default_rng(0).normal(size=(B, P)), jnp.float32)
    sched = make_schedule(diffusion, sampler.steps)
    keys = jax.random.split(jax.random.key(0), B)
    x_T = jax.random.normal(jax.random.key(1), (B, P))
    oracle = _gaussian_oracle(diffusion, mu, var_value)
    x0 = jax.jit(
        lambda x: sample_loop(oracle, sched, diffusion, sampler, jnp.zeros((B, 4)), x, keys)
    )(x_T)
    return (np.asarray(x0) - np.asarray(mu)) / SPREAD, np.asarray(x_T)


def test_ancestral_sampler_draws_the_data_distribution():
    z, _ = _sample(DiffusionConfig(learn_variance=False), SamplerConfig(steps=1000))
    assert abs(z.mean()) < 0.05 and abs(z.std() - 1.0) < 0.03  # 7680 standardised draws


@pytest.mark.parametrize("prediction", ["v", "eps", "x0"])
def test_ddim_follows_the_probability_flow(prediction):
    # For Gaussian data the ODE maps x_T to mu + s x_T; 1000 DDIM steps nearly reach it.
    diffusion = DiffusionConfig(learn_variance=False, prediction=prediction)
    z, x_T = _sample(diffusion, SamplerConfig(kind="ddim", steps=1000))
    assert np.abs(z - x_T).max() < 0.05


def test_learned_variance_spans_beta_tilde_to_beta():
    sampler = SamplerConfig(steps=50)
    for var_value, fixed in ((-1.0, "small"), (1.0, "large")):
        learned, _ = _sample(DiffusionConfig(), sampler, var_value)
        z, _ = _sample(DiffusionConfig(learn_variance=False, fixed_variance=fixed), sampler)
        # Step 0 of "large" uses beta tilde_1, not beta_0, as IDDPM; it adds no noise anyway.
        np.testing.assert_allclose(learned, z, atol=1e-4)


def test_ddim_with_eta_zero_is_a_deterministic_map_of_x_T():
    diffusion = DiffusionConfig(learn_variance=False)
    sampler = SamplerConfig(kind="ddim", steps=20)
    sched = make_schedule(diffusion, sampler.steps)

    def shrink(x_t, t, cond):  # a smooth stand-in network
        return 0.5 * x_t[:, None] + cond[:, :1, None]

    cond = jnp.ones((B, 3))
    x_T = jax.random.normal(jax.random.key(2), (B, P))
    first = sample_loop(
        shrink, sched, diffusion, sampler, cond, x_T, jax.random.split(jax.random.key(3), B)
    )
    second = sample_loop(
        shrink, sched, diffusion, sampler, cond, x_T, jax.random.split(jax.random.key(4), B)
    )
    np.testing.assert_array_equal(first, second)
    stochastic = dataclasses.replace(sampler, eta=1.0)
    third = sample_loop(
        shrink, sched, diffusion, stochastic, cond, x_T, jax.random.split(jax.random.key(4), B)
    )
    assert np.abs(np.asarray(third) - np.asarray(first)).max() > 1e-3


def test_generate_is_chunk_invariant_and_denormalises():
    config = generator_config(
        {"dit": {"depth": 1}, "sampler": {"kind": "ancestral", "steps": 5}},
        preset="fast",
        dit_preset="tiny",
    )
    model = DiT1D(config.dit, config.diffusion.out_channels)
    params = jax.jit(model.init)(
        jax.random.key(0), jnp.zeros((1, P)), jnp.zeros((1,), jnp.int32), jnp.ones((1, 8))
    )["params"]
    norm = NormStats(jnp.full((P,), 3.0), jnp.full((P,), 0.5), jnp.zeros(8))
    gen = GeneratorParams(params, norm)
    cond = np.random.default_rng(1).normal(size=(7, 8)).astype(np.float32)
    rng = jax.random.key(5)
    whole = np.asarray(generate(gen, cond, rng, config))
    small = dataclasses.replace(config.sampler, chunk_size=4)  # chunks of 4 and 3 (padded)
    chunked = np.asarray(generate(gen, cond, rng, config, sampler=small))
    assert whole.shape == (7, P)
    # Each query's sample is independent of the others in its chunk and of the padding.
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-5)
    assert abs(whole.mean() - 3.0) < 1.0  # raw space: centred on norm.center
    with pytest.raises(ValueError, match="width 5, the generator expects 8"):
        generate(gen, cond[:, :5], rng, config)
