"""The Familiarity Network f_mu and its entropy gate (METHOD.md §2.3).

Axes: B batch, E encoder width (the [CLS] size: 768 for bert-base, 384 for MiniLM),
F block width (expansion * E), K classes.

f_mu is a K-way classifier trained on *random* labels of the edit queries. Fitting random labels
is memorisation, so the network is confident (low output entropy) on the queries it saw and on
close neighbours such as paraphrases, and unsure (high entropy) elsewhere. The gate:
    H(x) = -sum_k p_k ln p_k   (p clamped at 1e-8, as the reference);   edited  <=>  H < epsilon.

Architecture (reference): 5 residual blocks x + Dropout(0.1)(Linear(F->E)(GELU(Linear(E->F)(x))))
with exact erf GELU, no normalisation, then Linear(E->K). Widths scale with the encoder width.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class FamiliarityConfig:
    """Shape of f_mu. `width` is the encoder width E; the block width is expansion * E."""

    width: int
    n_blocks: int = 5
    expansion: int = 4
    n_classes: int = 10
    dropout: float = 0.1

    def __post_init__(self):
        if self.width < 1 or self.n_blocks < 0 or self.n_classes < 2:
            raise ValueError(f"invalid familiarity network {self}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")


class FamiliarityNet(nn.Module):
    """x[B, E] -> logits[B, K]."""

    config: FamiliarityConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        cfg = self.config
        x = x.astype(jnp.float32)
        for i in range(cfg.n_blocks):
            h = nn.Dense(cfg.expansion * cfg.width, name=f"block{i}_in")(x)  # [B, F]
            h = nn.Dense(cfg.width, name=f"block{i}_out")(jax.nn.gelu(h, approximate=False))
            x = x + nn.Dropout(cfg.dropout, deterministic=not train)(h)
        return nn.Dense(cfg.n_classes, name="head")(x)


def entropy(logits: jnp.ndarray) -> jnp.ndarray:
    """Natural-log entropy [B] of softmax(logits[B, K]), probabilities clamped at 1e-8."""
    p = jnp.clip(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), 1e-8, 1.0)
    return -jnp.sum(p * jnp.log(p), axis=-1)


@functools.partial(jax.jit, static_argnums=0)
def familiarity_entropy(config: FamiliarityConfig, params, conditions: jnp.ndarray):
    """H [B] of f_mu on conditions[B, E] (raw, unnormalised [CLS] vectors of raw queries)."""
    return entropy(FamiliarityNet(config).apply({"params": params}, conditions))
