"""What the network predicts (v, eps or x0) and the conversions between them.

Axes: B batch, P neuron vector length. `alpha` and `sigma` are [B, 1] (or broadcastable):
alpha = sqrt(abar_t), sigma = sqrt(1 - abar_t), so alpha^2 + sigma^2 = 1 and
x_t = alpha * x0 + sigma * eps.

v-prediction (Salimans & Ho 2022) is the default: v = alpha * eps - sigma * x0. The reference
writes the target as (alpha * x_t - x0) / sigma, which is the same quantity, and inverts it with
x0 = alpha * x_t - sigma * v (the formula METHOD.md §4.1 says to follow; the "(x_t - sigma v) /
alpha" sometimes quoted for the paper is the eps formula and is wrong for v).
"""

import jax.numpy as jnp

PREDICTIONS = ("v", "eps", "x0")


def v_from_x0_eps(x0: jnp.ndarray, eps: jnp.ndarray, alpha, sigma) -> jnp.ndarray:
    """The velocity target v = alpha * eps - sigma * x0."""
    return alpha * eps - sigma * x0


def x0_from_v(x_t: jnp.ndarray, v: jnp.ndarray, alpha, sigma) -> jnp.ndarray:
    """x0 = alpha * x_t - sigma * v (exact for any t, no division)."""
    return alpha * x_t - sigma * v


def eps_from_v(x_t: jnp.ndarray, v: jnp.ndarray, alpha, sigma) -> jnp.ndarray:
    """eps = sigma * x_t + alpha * v."""
    return sigma * x_t + alpha * v


def x0_from_eps(x_t: jnp.ndarray, eps: jnp.ndarray, alpha, sigma) -> jnp.ndarray:
    """x0 = (x_t - sigma * eps) / alpha (ill-conditioned where alpha -> 0, i.e. t near T)."""
    return (x_t - sigma * eps) / alpha


def eps_from_x0(x_t: jnp.ndarray, x0: jnp.ndarray, alpha, sigma) -> jnp.ndarray:
    """eps = (x_t - alpha * x0) / sigma."""
    return (x_t - alpha * x0) / sigma


def training_target(
    prediction: str, x0: jnp.ndarray, eps: jnp.ndarray, alpha, sigma
) -> jnp.ndarray:
    """The regression target of the mean channel for `prediction` in ("v", "eps", "x0")."""
    if prediction == "v":
        return v_from_x0_eps(x0, eps, alpha, sigma)
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    raise ValueError(f"prediction: expected one of {PREDICTIONS}, got {prediction!r}")


def predicted_x0(
    prediction: str, output: jnp.ndarray, x_t: jnp.ndarray, alpha, sigma
) -> jnp.ndarray:
    """The network's estimate of x0 from its mean-channel `output` at x_t (no clipping)."""
    if prediction == "v":
        return x0_from_v(x_t, output, alpha, sigma)
    if prediction == "eps":
        return x0_from_eps(x_t, output, alpha, sigma)
    if prediction == "x0":
        return output
    raise ValueError(f"prediction: expected one of {PREDICTIONS}, got {prediction!r}")


def predicted_eps(
    prediction: str, output: jnp.ndarray, x_t: jnp.ndarray, alpha, sigma
) -> jnp.ndarray:
    """The network's estimate of the noise; direct for v and eps (no division by sigma)."""
    if prediction == "v":
        return eps_from_v(x_t, output, alpha, sigma)
    if prediction == "eps":
        return output
    if prediction == "x0":
        return eps_from_x0(x_t, output, alpha, sigma)
    raise ValueError(f"prediction: expected one of {PREDICTIONS}, got {prediction!r}")
