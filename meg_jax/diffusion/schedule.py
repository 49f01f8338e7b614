"""Noise schedule tables of the Gaussian diffusion, full and respaced.

Axes: K steps of the (possibly respaced) chain; T steps of the training chain (1000).

All tables are computed once in float64 with numpy, as the reference does (products of 1000
factors close to 1 lose precision in float32), and cast to float32 jnp arrays once. A respaced
schedule keeps K of the T steps and recomputes its betas from the kept alphas_cumprod, so that
the kept steps have exactly the marginals q(x_t | x_0) of the full chain; the network is still
called with the original timestep index (`Schedule.timesteps`).
"""

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from meg_jax.diffusion.config import DiffusionConfig


class Schedule(NamedTuple):
    """Per-step tables, each [K] float32 (`timesteps` int32); index k is step k of this chain."""

    timesteps: jnp.ndarray  # [K] the training-chain timestep the network sees at step k
    betas: jnp.ndarray
    log_betas: jnp.ndarray
    alphas_cumprod: jnp.ndarray
    alphas_cumprod_prev: jnp.ndarray
    sqrt_alphas_cumprod: jnp.ndarray  # alpha_t in the v-parameterisation
    sqrt_one_minus_alphas_cumprod: jnp.ndarray  # sigma_t
    posterior_variance: jnp.ndarray  # beta tilde
    posterior_log_variance_clipped: jnp.ndarray  # log beta tilde, step 0 borrowed from step 1
    posterior_mean_coef1: jnp.ndarray  # weight of x0 in the mean of q(x_{t-1} | x_t, x0)
    posterior_mean_coef2: jnp.ndarray  # weight of x_t
    fixed_large_log_variance: jnp.ndarray  # log beta, step 0 replaced by log beta tilde_1

    @property
    def num_steps(self) -> int:
        return int(self.betas.shape[0])


def linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """[T] float64 linear betas, rescaled by 1000 / T as in IDDPM so any T spans the same range."""
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64)


def schedule_tables(betas: np.ndarray) -> dict[str, np.ndarray]:
    """All tables of `Schedule` (except `timesteps`) in float64, from [K] betas."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.shape[0] < 2:
        raise ValueError(f"betas: expected a 1-D array of >= 2 steps, got shape {betas.shape}")
    if not np.all((betas > 0) & (betas <= 1)):
        raise ValueError("betas: expected every value in (0, 1]")
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    # The posterior variance is 0 at step 0; its log is clipped to step 1's value.
    post_log_var = np.log(np.append(post_var[1], post_var[1:]))
    return {
        "betas": betas,
        "log_betas": np.log(betas),
        "alphas_cumprod": abar,
        "alphas_cumprod_prev": abar_prev,
        "sqrt_alphas_cumprod": np.sqrt(abar),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - abar),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": post_log_var,
        "posterior_mean_coef1": betas * np.sqrt(abar_prev) / (1.0 - abar),
        "posterior_mean_coef2": (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
        "fixed_large_log_variance": np.log(np.append(post_var[1], betas[1:])),
    }


def respaced_timesteps(num_timesteps: int, steps: int) -> np.ndarray:
    """[K] int64: the kept steps round(i * (T - 1) / (K - 1)), i = 0..K-1 (IDDPM's "K" spacing)."""
    if not 2 <= steps <= num_timesteps:
        raise ValueError(f"respacing: expected 2 <= steps <= {num_timesteps}, got {steps}")
    kept = np.round(np.arange(steps) * (num_timesteps - 1) / (steps - 1)).astype(np.int64)
    if len(np.unique(kept)) != steps:  # cannot happen for steps <= T, kept as a guard
        raise ValueError(f"respacing: {steps} steps of {num_timesteps} collide")
    return kept


def make_schedule(config: DiffusionConfig, steps: int | None = None) -> Schedule:
    """The training chain (`steps` None or T) or its respacing to `steps` evenly strided steps.

    The respaced betas are 1 - abar[t_k] / abar[t_{k-1}] (abar[t_{-1}] = 1), so the kept steps
    share the full chain's alphas_cumprod exactly.
    """
    full = linear_betas(config.num_timesteps, config.beta_start, config.beta_end)
    if steps is None or steps == config.num_timesteps:
        kept = np.arange(config.num_timesteps)
        betas = full
    else:
        kept = respaced_timesteps(config.num_timesteps, steps)
        abar_kept = np.cumprod(1.0 - full)[kept]
        betas = 1.0 - abar_kept / np.append(1.0, abar_kept[:-1])
    tables = schedule_tables(betas)
    return Schedule(
        timesteps=jnp.asarray(kept, dtype=jnp.int32),
        **{name: jnp.asarray(value, dtype=jnp.float32) for name, value in tables.items()},
    )


def extract(table: jnp.ndarray, k: jnp.ndarray) -> jnp.ndarray:
    """table[k] as [B, 1], ready to broadcast against [B, P] (k: [B] int step indices)."""
    return table[k][:, None]
