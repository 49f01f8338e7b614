"""Per-item training losses: MSE on the prediction target, plus IDDPM's VLB term when the
variance is learned (the reference's "hybrid" loss).

Axes: B batch, P neuron vector length, C network output channels.

The VLB term follows IDDPM exactly, in bits per dimension:
- for t > 0, KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)), averaged over P;
- for t = 0, the negative log-likelihood of x0 under a discretised Gaussian decoder with bins of
  width 2/255. That decoder was designed for 8-bit images in [-1, 1]; we keep it because the
  reference does (its values for neuron weights are not a meaningful likelihood, only a term).
The mean channel is stop-gradiented inside the VLB term, so it only trains the variance channel
and the MSE alone shapes the mean.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from meg_jax.diffusion.config import DiffusionConfig
from meg_jax.diffusion.parameterization import training_target
from meg_jax.diffusion.process import p_mean_variance, q_posterior, split_output
from meg_jax.diffusion.schedule import Schedule, extract

_LOG2 = float(np.log(2.0))


class LossTerms(NamedTuple):
    """Per-item losses, each [B]; `loss` = `mse` + `vb` (vb is zero without learned variance)."""

    loss: jnp.ndarray
    mse: jnp.ndarray
    vb: jnp.ndarray


def normal_kl(mean1, logvar1, mean2, logvar2) -> jnp.ndarray:
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + jnp.exp(logvar1 - logvar2)
        + jnp.square(mean1 - mean2) * jnp.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: jnp.ndarray) -> jnp.ndarray:
    """The tanh approximation of the standard normal CDF that IDDPM uses."""
    return 0.5 * (1.0 + jnp.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(
    x: jnp.ndarray, means: jnp.ndarray, log_scales: jnp.ndarray
) -> jnp.ndarray:
    """Elementwise log-probability of x's 2/255-wide bin under N(means, e^(2 log_scales)).

    The outermost bins (x < -0.999 or x > 0.999) extend to -inf / +inf, as for images.
    """
    centered = x - means
    inv_std = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(
        x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta)
    )


def vlb_bits(
    sched: Schedule,
    config: DiffusionConfig,
    output: jnp.ndarray,
    x0: jnp.ndarray,
    x_t: jnp.ndarray,
    k: jnp.ndarray,
) -> jnp.ndarray:
    """[B] VLB term in bits per dimension: decoder NLL at step 0, the posterior KL elsewhere."""
    true = q_posterior(sched, x0, x_t, k)
    model = p_mean_variance(sched, config, output, x_t, k)
    kl = normal_kl(true.mean, true.log_variance, model.mean, model.log_variance)
    kl = jnp.mean(kl, axis=-1) / _LOG2
    log_scales = jnp.broadcast_to(0.5 * model.log_variance, x0.shape)
    nll = -discretized_gaussian_log_likelihood(x0, model.mean, log_scales)
    nll = jnp.mean(nll, axis=-1) / _LOG2
    return jnp.where(k == 0, nll, kl)


def training_losses(
    sched: Schedule,
    config: DiffusionConfig,
    output: jnp.ndarray,
    x0: jnp.ndarray,
    noise: jnp.ndarray,
    x_t: jnp.ndarray,
    k: jnp.ndarray,
) -> LossTerms:
    """Losses of the network `output` [B, C, P] for x_t = q_sample(x0, k, noise).

    `sched` must be the training chain (k is the timestep). Computed in float32 whatever the
    network's compute dtype.
    """
    output = output.astype(jnp.float32)
    mean_out, _ = split_output(output, config)
    alpha = extract(sched.sqrt_alphas_cumprod, k)
    sigma = extract(sched.sqrt_one_minus_alphas_cumprod, k)
    target = training_target(config.prediction, x0, noise, alpha, sigma)
    mse = jnp.mean(jnp.square(target - mean_out), axis=-1)
    if not config.learn_variance:
        return LossTerms(mse, mse, jnp.zeros_like(mse))
    # The VLB must not move the mean: only the variance channel receives its gradient.
    frozen = output.at[:, 0].set(jax.lax.stop_gradient(mean_out))
    vb = vlb_bits(sched, config, frozen, x0, x_t, k)
    return LossTerms(mse + vb, mse, vb)
