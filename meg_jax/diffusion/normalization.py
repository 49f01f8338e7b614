"""Invertible affine map between raw neuron weights and the diffusion's x0 space, and the
centring of condition vectors.

Axes: N bank rows, B batch, P neuron vector length, E condition width.

x0 = (w - center) / scale and w = x0 * scale + center, with `center` and `scale` [P] vectors
(`NormStats`, saved with the training state so sampling can invert the map).

- "scale" (the reference): center 0, scale 0.01 everywhere, i.e. x0 = 100 w.
- "standardize": center = the bank mean ("mean") or the shared initial neuron ("init"), and
  scale = max(std over the bank, std_floor) per dimension, or one global RMS of (w - center)
  (`per_dimension=False`). Per-dimension scaling weighs every dimension equally in the loss,
  while the stopping criterion is a raw-space L2 dominated by the high-variance dimensions; the
  global scale keeps the two aligned. The diffusion assumes x0 of unit scale
  against unit noise; fitted neurons are far from it under the x100 scale (the SmolLM2 bank
  has raw per-dimension std from 0.0015 to 0.56, so x100 spans 0.15 to 56). Note that
  standardising (w - init) with its mean removed is the same map as standardising w, since the
  init is a constant: "init" centering is the variant where the init matters.

Conditions: the network L2-normalises its condition. Sentence-encoder [CLS] vectors of templated
prompts share a large common component (MiniLM on the SmolLM2 bank: mean pairwise cosine 0.70),
so after normalisation the items differ little. `center_conditions` subtracts the bank's mean
condition first (the reference does not); at sampling the same vector is subtracted.
"""

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from meg_jax.diffusion.config import NormalizationConfig


class NormStats(NamedTuple):
    """The maps' parameters (float32)."""

    center: jnp.ndarray  # [P]
    scale: jnp.ndarray  # [P]
    cond_center: jnp.ndarray  # [E], zeros unless center_conditions


def fit_normalization(
    config: NormalizationConfig,
    weights: np.ndarray,
    conditions: np.ndarray,
    init: np.ndarray | None = None,
) -> NormStats:
    """Fits `NormStats` on the training bank: `weights` [N, P] (finite rows only) and their
    `conditions` [N, E]. `init` [P] is required for center="init" and otherwise ignored.
    """
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 2 or weights.shape[0] == 0:
        raise ValueError(f"normalization: expected weights [N >= 1, P], got shape {weights.shape}")
    if not np.all(np.isfinite(weights)):
        raise ValueError("normalization: weights contain NaN or inf; filter failed rows first")
    length = weights.shape[1]
    if config.kind == "scale":
        center = np.zeros(length)
        scale = np.full(length, config.scale)
    else:
        if config.center == "init":
            if init is None:
                raise ValueError("normalization: center='init' needs the shared initial neuron")
            center = np.asarray(init, dtype=np.float64).reshape(-1)
            if center.shape != (length,):
                raise ValueError(
                    f"normalization: init has shape {np.shape(init)}, expected [{length}]"
                )
        else:
            center = weights.mean(axis=0)
        if config.per_dimension:
            scale = np.maximum(weights.std(axis=0), config.std_floor)
        else:
            scale = np.full(
                length, max(np.sqrt(np.mean((weights - center) ** 2)), config.std_floor)
            )
    conditions = np.asarray(conditions, dtype=np.float64)
    if conditions.ndim != 2 or conditions.shape[0] != weights.shape[0]:
        raise ValueError(
            f"normalization: conditions must be [{weights.shape[0]}, E], got {conditions.shape}"
        )
    if config.center_conditions:
        cond_center = conditions.mean(axis=0)
    else:
        cond_center = np.zeros(conditions.shape[1])
    return NormStats(*(jnp.asarray(a, jnp.float32) for a in (center, scale, cond_center)))


def normalize(stats: NormStats, weights: jnp.ndarray) -> jnp.ndarray:
    """Raw weights [B, P] -> x0 [B, P]."""
    return (weights - stats.center) / stats.scale


def denormalize(stats: NormStats, x0: jnp.ndarray) -> jnp.ndarray:
    """x0 [B, P] -> raw weights [B, P] (the inverse of `normalize`)."""
    return x0 * stats.scale + stats.center


def center_conditions(stats: NormStats, conditions: jnp.ndarray) -> jnp.ndarray:
    """Condition vectors [B, E] as the network sees them (before its L2 normalisation)."""
    return conditions - stats.cond_center
