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


ROW_CHUNK = 1024  # rows per float64 block: statistics of a large bank without a float64 copy


def _blocks(weights: np.ndarray):
    """`weights` [N, P] as float64 blocks of at most ROW_CHUNK rows, each checked finite."""
    for start in range(0, weights.shape[0], ROW_CHUNK):
        block = np.asarray(weights[start : start + ROW_CHUNK], dtype=np.float64)
        if not np.all(np.isfinite(block)):
            raise ValueError("normalization: weights contain NaN or inf; filter failed rows first")
        yield block


def _row_mean(weights: np.ndarray, fn=None) -> np.ndarray:
    """Mean over rows of `fn(block)` (the rows themselves without `fn`): [N, P] -> [P]."""
    total = np.zeros(weights.shape[1])
    for block in _blocks(weights):
        total += (block if fn is None else fn(block)).sum(axis=0)
    return total / weights.shape[0]


def fit_normalization(
    config: NormalizationConfig,
    weights: np.ndarray,
    conditions: np.ndarray,
    init: np.ndarray | None = None,
) -> NormStats:
    """Fits `NormStats` on the training bank: `weights` [N, P] (finite rows only) and their
    `conditions` [N, E]. `init` [P] is required for center="init" and otherwise ignored.
    The weights are read in float64 blocks of ROW_CHUNK rows, so a 10,000-row bank is not
    copied whole (the one-bank-copy rule of the generator's training).
    """
    weights = np.asarray(weights)
    if weights.ndim != 2 or weights.shape[0] == 0:
        raise ValueError(f"normalization: expected weights [N >= 1, P], got shape {weights.shape}")
    length = weights.shape[1]
    if config.kind == "scale":
        for _ in _blocks(weights):  # refuses non-finite rows, as every kind does
            pass
        center = np.zeros(length)
        scale = np.full(length, config.scale)
    else:
        mean = _row_mean(weights)
        center = mean
        if config.center == "init":
            if init is None:
                raise ValueError("normalization: center='init' needs the shared initial neuron")
            center = np.asarray(init, dtype=np.float64).reshape(-1)
            if center.shape != (length,):
                raise ValueError(
                    f"normalization: init has shape {np.shape(init)}, expected [{length}]"
                )
        if config.per_dimension:  # each dimension's own spread, about its mean
            variance = _row_mean(weights, lambda block: (block - mean) ** 2)
            scale = np.maximum(np.sqrt(variance), config.std_floor)
        else:  # one spread about the center
            squares = _row_mean(weights, lambda block: (block - center) ** 2).mean()
            scale = np.full(length, max(np.sqrt(squares), config.std_floor))
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
