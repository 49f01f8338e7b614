"""The forward (corruption) and reverse Gaussian processes, given a schedule.

Axes: B batch, P neuron vector length, C network output channels (1, or 2 with learned
variance). `k` is a [B] int array of step indices into the schedule's tables (for the training
chain, k equals the timestep t).

- q_sample: x_t ~ q(x_t | x0) = N(alpha x0, sigma^2).
- q_posterior: the true reverse step q(x_{t-1} | x_t, x0).
- p_mean_variance: the model's reverse step p(x_{t-1} | x_t) from the network output: the mean is
  the posterior mean at the predicted x0; the variance is fixed, or (IDDPM "learned range") the
  second channel interpolates log sigma^2 between log beta tilde_t and log beta_t.
"""

from typing import NamedTuple

import jax.numpy as jnp

from meg_jax.diffusion.config import DiffusionConfig
from meg_jax.diffusion.parameterization import predicted_x0
from meg_jax.diffusion.schedule import Schedule, extract


class Gaussian(NamedTuple):
    """A diagonal Gaussian over [B, P]; `log_variance` broadcasts ([B, P] or [B, 1])."""

    mean: jnp.ndarray
    log_variance: jnp.ndarray


class ReverseStep(NamedTuple):
    """The model's p(x_{t-1} | x_t) and the x0 estimate it was built from."""

    mean: jnp.ndarray  # [B, P]
    log_variance: jnp.ndarray  # [B, P] (learned) or [B, 1] (fixed)
    x0: jnp.ndarray  # [B, P]


def q_sample(sched: Schedule, x0: jnp.ndarray, k: jnp.ndarray, noise: jnp.ndarray) -> jnp.ndarray:
    """x_t = alpha_t * x0 + sigma_t * noise, [B, P]."""
    return (
        extract(sched.sqrt_alphas_cumprod, k) * x0
        + extract(sched.sqrt_one_minus_alphas_cumprod, k) * noise
    )


def q_posterior(sched: Schedule, x0: jnp.ndarray, x_t: jnp.ndarray, k: jnp.ndarray) -> Gaussian:
    """q(x_{t-1} | x_t, x0) with the clipped log variance (finite at step 0)."""
    mean = (
        extract(sched.posterior_mean_coef1, k) * x0 + extract(sched.posterior_mean_coef2, k) * x_t
    )
    return Gaussian(mean, extract(sched.posterior_log_variance_clipped, k))


def split_output(output: jnp.ndarray, config: DiffusionConfig) -> tuple[jnp.ndarray, jnp.ndarray]:
    """[B, C, P] network output -> (mean channel [B, P], variance channel [B, P] or None)."""
    if output.ndim != 3 or output.shape[1] != config.out_channels:
        raise ValueError(
            f"network output: expected [B, {config.out_channels}, P], got {output.shape}"
        )
    return output[:, 0], (output[:, 1] if config.learn_variance else None)


def model_log_variance(
    sched: Schedule, config: DiffusionConfig, var_values: jnp.ndarray | None, k: jnp.ndarray
) -> jnp.ndarray:
    """log sigma^2 of the reverse step: learned range ([B, P]) or fixed ([B, 1])."""
    if config.learn_variance:
        # var_values in [-1, 1] maps to [log beta tilde, log beta]; the reference does not clamp.
        frac = (var_values + 1.0) / 2.0
        min_log = extract(sched.posterior_log_variance_clipped, k)
        max_log = extract(sched.log_betas, k)
        return frac * max_log + (1.0 - frac) * min_log
    if config.fixed_variance == "small":
        return extract(sched.posterior_log_variance_clipped, k)
    return extract(sched.fixed_large_log_variance, k)


def p_mean_variance(
    sched: Schedule,
    config: DiffusionConfig,
    output: jnp.ndarray,
    x_t: jnp.ndarray,
    k: jnp.ndarray,
) -> ReverseStep:
    """The reverse step implied by the network `output` [B, C, P] at x_t (no x0 clipping)."""
    mean_out, var_values = split_output(output, config)
    alpha = extract(sched.sqrt_alphas_cumprod, k)
    sigma = extract(sched.sqrt_one_minus_alphas_cumprod, k)
    x0 = predicted_x0(config.prediction, mean_out, x_t, alpha, sigma)
    mean = q_posterior(sched, x0, x_t, k).mean
    return ReverseStep(mean, model_log_variance(sched, config, var_values, k), x0)
