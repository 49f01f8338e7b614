"""Small building blocks of the host LLMs: norms, rotary position embedding, activations.

Axes: B batch, T query tokens, H heads, K head dim, R rotary dims.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from meg_jax.models.config import LMConfig


class RMSNorm(nn.Module):
    """Llama's RMSNorm: statistics in float32, scale applied in the compute dtype (as HF)."""

    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale * normed.astype(self.dtype)


def make_norm(config: LMConfig, name: str) -> nn.Module:
    """The family's norm: RMSNorm for Llama, LayerNorm with bias for GPT-J and Phi-2."""
    if config.norm_kind == "rms":
        return RMSNorm(config.norm_eps, config.jnp_dtype, name=name)
    return nn.LayerNorm(
        epsilon=config.norm_eps,
        dtype=config.jnp_dtype,
        param_dtype=config.jnp_dtype,
        name=name,
    )


def mlp_activation(config: LMConfig):
    """SiLU for the gated Llama MLP, tanh-approximated GELU (`gelu_new`) for GPT-J and Phi-2."""
    if config.gated_mlp:
        return jax.nn.silu
    return lambda x: jax.nn.gelu(x, approximate=True)


def rotary_inv_freq(config: LMConfig) -> np.ndarray:
    """[R/2] inverse frequencies in float32, with Llama-3 scaling when the config asks for it."""
    dim = config.rotary_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (1.0 / (np.float32(config.rope_theta) ** exponents)).astype(np.float32)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    low_wavelen = scaling.original_max_position / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rotary(x: jnp.ndarray, positions: jnp.ndarray, config: LMConfig) -> jnp.ndarray:
    """Rotates the first R dims of every head of x[B, T, H, K] by position[B, T]."""
    rot = config.rotary_dim
    angles = positions.astype(jnp.float32)[..., None] * rotary_inv_freq(config)  # [B, T, R/2]
    cos = jnp.cos(angles)[:, :, None, :]  # [B, T, 1, R/2]
    sin = jnp.sin(angles)[:, :, None, :]
    x_rot = x[..., :rot].astype(jnp.float32)
    if config.rope_interleaved:
        # GPT-J: dims (2i, 2i+1) form the rotated pairs.
        first, second = x_rot[..., 0::2], x_rot[..., 1::2]
        out = jnp.stack([first * cos - second * sin, second * cos + first * sin], axis=-1)
        out = out.reshape(x_rot.shape)
    else:
        # NeoX/Llama: dims i and i + R/2 form the rotated pairs.
        first, second = x_rot[..., : rot // 2], x_rot[..., rot // 2 :]
        out = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return jnp.concatenate([out.astype(x.dtype), x[..., rot:]], axis=-1)
