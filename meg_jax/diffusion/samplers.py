"""Reverse-process samplers: IDDPM ancestral sampling and DDIM, each one `lax.scan` over steps.

Axes: B batch (queries), P neuron vector length, E condition width, C output channels, K steps
of the (respaced) sampling chain.

`apply_fn(x_t [B, P], t [B] int32, cond [B, E]) -> output [B, C, P]` is the network in inference
mode; `t` is the training-chain timestep (`Schedule.timesteps[k]`), as the reference's respaced
sampler feeds it. Noise is drawn per item from its own key (`item_keys`, one per query), folded
with the step index, so a query's sample does not depend on which other queries share its batch
or on how a large batch is chunked.

Neither sampler clips x0 (the reference samples with clip_denoised=False). Callers jit the loop:
the scan body compiles once whatever K is.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from meg_jax.diffusion.config import DiffusionConfig, SamplerConfig
from meg_jax.diffusion.parameterization import predicted_eps, predicted_x0
from meg_jax.diffusion.process import p_mean_variance, split_output
from meg_jax.diffusion.schedule import Schedule, extract

ApplyFn = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]


def step_noise(item_keys: jax.Array, k: jnp.ndarray, length: int) -> jnp.ndarray:
    """[B, P] standard normal noise for step k, item i's drawn from fold_in(item_keys[i], k)."""
    return jax.vmap(lambda key: jax.random.normal(jax.random.fold_in(key, k), (length,)))(item_keys)


def ancestral_step(
    sched: Schedule,
    config: DiffusionConfig,
    output: jnp.ndarray,
    x_t: jnp.ndarray,
    k: jnp.ndarray,
    noise: jnp.ndarray,
) -> jnp.ndarray:
    """IDDPM p_sample: x_{t-1} = mean + sigma * noise, with no noise added at step 0."""
    step = p_mean_variance(sched, config, output, x_t, k)
    nonzero = (k != 0).astype(x_t.dtype)[:, None]
    return step.mean + nonzero * jnp.exp(0.5 * step.log_variance) * noise


def ddim_step(
    sched: Schedule,
    config: DiffusionConfig,
    output: jnp.ndarray,
    x_t: jnp.ndarray,
    k: jnp.ndarray,
    noise: jnp.ndarray,
    eta: float,
) -> jnp.ndarray:
    """DDIM (Song et al. 2021, eq. 12) from step k to the chain's previous step.

    The learned-variance channel, if any, is ignored: DDIM's variance is set by eta.
    """
    mean_out, _ = split_output(output, config)
    alpha = extract(sched.sqrt_alphas_cumprod, k)
    sigma = extract(sched.sqrt_one_minus_alphas_cumprod, k)
    x0 = predicted_x0(config.prediction, mean_out, x_t, alpha, sigma)
    eps = predicted_eps(config.prediction, mean_out, x_t, alpha, sigma)
    abar = extract(sched.alphas_cumprod, k)
    abar_prev = extract(sched.alphas_cumprod_prev, k)
    sigma_eta = eta * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev))
    direction = jnp.sqrt(jnp.maximum(1.0 - abar_prev - jnp.square(sigma_eta), 0.0)) * eps
    nonzero = (k != 0).astype(x_t.dtype)[:, None]
    return x0 * jnp.sqrt(abar_prev) + direction + nonzero * sigma_eta * noise


def sample_loop(
    apply_fn: ApplyFn,
    sched: Schedule,
    diffusion: DiffusionConfig,
    sampler: SamplerConfig,
    cond: jnp.ndarray,
    x_T: jnp.ndarray,
    item_keys: jax.Array,
) -> jnp.ndarray:
    """Runs the reverse chain from x_T [B, P] to x0 [B, P] (normalised space).

    `sched` is the sampling chain (usually `make_schedule(diffusion, sampler.steps)`); `item_keys`
    is a [B] key array for the per-step noise (unused by DDIM with eta = 0, but harmless).
    """
    batch, length = x_T.shape
    if cond.shape[0] != batch or item_keys.shape[0] != batch:
        raise ValueError(
            f"sample_loop: cond {cond.shape}, x_T {x_T.shape} and item_keys {item_keys.shape} "
            "must share the batch size"
        )

    def body(x_t, k):
        kb = jnp.full((batch,), k, dtype=jnp.int32)
        t = jnp.full((batch,), sched.timesteps[k], dtype=jnp.int32)
        output = apply_fn(x_t, t, cond).astype(jnp.float32)
        if sampler.kind == "ddim" and sampler.eta == 0:
            noise = jnp.zeros_like(x_t)  # deterministic DDIM: skip drawing unused noise
        else:
            noise = step_noise(item_keys, k, length)
        if sampler.kind == "ancestral":
            x_prev = ancestral_step(sched, diffusion, output, x_t, kb, noise)
        else:
            x_prev = ddim_step(sched, diffusion, output, x_t, kb, noise, sampler.eta)
        return x_prev, None

    steps = jnp.arange(sched.num_steps - 1, -1, -1, dtype=jnp.int32)  # [K] from K-1 down to 0
    x0, _ = jax.lax.scan(body, x_T.astype(jnp.float32), steps)
    return x0
