"""The denoiser: a 1-D DiT over the neuron vector, conditioned by adaLN on (timestep, query).

Axes: B batch, P neuron vector length, S patch size (values per token), N tokens = ceil(P / S),
D hidden width, H heads, Dh = D / H head width, E condition width, C output channels,
F frequency features of the timestep.

Forward: x [B, P] is right zero-padded to N * S and cut into N tokens of S values; Linear(S -> D)
plus a fixed 1-D sin-cos position embedding; `depth` adaLN blocks; an adaLN final LayerNorm and
Linear(D -> C * S); un-patch to [B, C, N * S] and crop to [B, C, P]. The conditioning vector is
c = TimestepEmbedder(t) + proj(cond_scale * cond / |cond|), with dropout on c during training
(reference: cond_scale 1, p = 0.2). `proj` is the identity when E == D, as in the reference
(which adds the 768-d BERT vector straight onto the 768-wide c). With `cond_tokens` a second
Linear(E -> D) of the scaled condition is also added to every token after the position embedding.

The reference's head is Linear(D -> C * D) followed by a shared Linear(D -> S) per channel, a
product of two linear maps; we use the single Linear(D -> C * S) it composes to (same function
class up to rank, fewer parameters).

Initialisation: PyTorch's nn.Linear default (weights and biases U(+-1/sqrt(fan_in))), because the
reference's `initialize_weights` (adaLN-Zero) is commented out. `adaln_zero=True` restores the
DiT paper's init: xavier-uniform weights, zero biases, N(0, 0.02) timestep MLP, and zeroed
modulation and output layers, so every block starts as the identity and the output as 0.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from meg_jax.diffusion.config import DiTConfig


def sincos_positions(num_tokens: int, dim: int) -> np.ndarray:
    """[N, D] float32 fixed 1-D position embedding: [sin(n w_i) | cos(n w_i)], w_i = 1e4^(-2i/D)."""
    if dim % 2:
        raise ValueError(f"position embedding width must be even, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.arange(num_tokens, dtype=np.float64)[:, None] * omega[None]  # [N, D/2]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32)


def timestep_features(t: jnp.ndarray, dim: int, max_period: float = 10000.0) -> jnp.ndarray:
    """[B, F] sinusoidal features [cos(t f_i) | sin(t f_i)], f_i = max_period^(-i / (F/2))."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]  # [B, F/2]
    features = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        features = jnp.pad(features, ((0, 0), (0, 1)))
    return features


def _torch_default_bias(fan_in: int):
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _dense(config: DiTConfig, features: int, fan_in: int, role: str = "plain", name=None):
    """A Linear with the init of `role` ("plain" | "zero" | "timestep") under the chosen scheme."""
    dtype = jnp.dtype(config.compute_dtype)
    if not config.adaln_zero:
        kernel = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
        bias = _torch_default_bias(fan_in)
    elif role == "zero":
        kernel, bias = nn.initializers.zeros, nn.initializers.zeros
    elif role == "timestep":
        kernel, bias = nn.initializers.normal(0.02), nn.initializers.zeros
    else:
        kernel, bias = nn.initializers.xavier_uniform(), nn.initializers.zeros
    return nn.Dense(
        features,
        kernel_init=kernel,
        bias_init=bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def _modulate(x: jnp.ndarray, shift: jnp.ndarray, scale: jnp.ndarray) -> jnp.ndarray:
    return x * (1.0 + scale[:, None]) + shift[:, None]  # [B, N, D] by per-item [B, D]


def _layer_norm(config: DiTConfig, name: str) -> nn.LayerNorm:
    # No affine parameters: the adaLN shift and scale take their place.
    return nn.LayerNorm(
        epsilon=1e-6,
        use_bias=False,
        use_scale=False,
        dtype=jnp.dtype(config.compute_dtype),
        name=name,
    )


class TimestepEmbedder(nn.Module):
    """t [B] -> [B, D]: sinusoidal features -> Linear -> SiLU -> Linear."""

    config: DiTConfig

    @nn.compact
    def __call__(self, t: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        h = timestep_features(t, cfg.frequency_dim)
        h = _dense(cfg, cfg.hidden, cfg.frequency_dim, "timestep", name="fc1")(h)
        return _dense(cfg, cfg.hidden, cfg.hidden, "timestep", name="fc2")(nn.silu(h))


class SelfAttention(nn.Module):
    """Multi-head self-attention over the N tokens, with qkv bias."""

    config: DiTConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        batch, tokens, width = x.shape
        head_dim = width // cfg.heads
        qkv = _dense(cfg, 3 * width, width, name="qkv")(x)
        qkv = qkv.reshape(batch, tokens, 3, cfg.heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each [B, N, H, Dh]
        # softmax(q k^T / sqrt(Dh)) v per head; XLA's fused attention is several times faster
        # on CPU than the two batched einsums it replaces (and identical in value).
        out = jax.nn.dot_product_attention(q, k, v)  # [B, N, H, Dh]
        return _dense(cfg, width, width, name="proj")(out.reshape(batch, tokens, width))


class DiTBlock(nn.Module):
    """Pre-norm transformer block whose norms are modulated (shift, scale) and whose residual
    branches are gated, all six vectors regressed from c."""

    config: DiTConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray, c: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        mod = _dense(cfg, 6 * cfg.hidden, cfg.hidden, "zero", name="adaLN")(nn.silu(c))
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(mod, 6, axis=-1)
        h = _modulate(_layer_norm(cfg, "norm1")(x), shift_a, scale_a)
        x = x + gate_a[:, None] * SelfAttention(cfg, name="attn")(h)
        h = _modulate(_layer_norm(cfg, "norm2")(x), shift_m, scale_m)
        mlp_width = int(cfg.hidden * cfg.mlp_ratio)
        h = _dense(cfg, mlp_width, cfg.hidden, name="fc1")(h)
        h = _dense(cfg, cfg.hidden, mlp_width, name="fc2")(nn.gelu(h, approximate=True))
        return x + gate_m[:, None] * h


class DiT1D(nn.Module):
    """The denoiser: (x_t [B, P], t [B], cond [B, E]) -> [B, C, P] float32.

    `train=True` enables the dropout on c and needs a "dropout" rng.
    """

    config: DiTConfig
    out_channels: int = 2

    @nn.compact
    def __call__(
        self, x: jnp.ndarray, t: jnp.ndarray, cond: jnp.ndarray, train: bool = False
    ) -> jnp.ndarray:
        cfg = self.config
        dtype = jnp.dtype(cfg.compute_dtype)
        batch, length = x.shape
        size = cfg.patch_size
        tokens = -(-length // size)
        x = jnp.pad(x, ((0, 0), (0, tokens * size - length))).reshape(batch, tokens, size)
        x = _dense(cfg, cfg.hidden, size, name="patch_in")(x.astype(dtype))  # [B, N, D]
        x = x + jnp.asarray(sincos_positions(tokens, cfg.hidden), dtype)[None]

        cond = cond.astype(jnp.float32)
        if train and cfg.cond_noise > 0:
            # A random step of about `cond_noise` from the unit condition: the generator learns
            # to give a neighbourhood of each training query its neuron, so a paraphrase (a
            # nearby condition that training never showed) gets that neuron too.
            noise = jax.random.normal(self.make_rng("dropout"), cond.shape, jnp.float32)
            unit = cond / jnp.maximum(jnp.linalg.norm(cond, axis=-1, keepdims=True), 1e-12)
            cond = unit + noise * (cfg.cond_noise / math.sqrt(cond.shape[-1]))
        norm = jnp.maximum(jnp.linalg.norm(cond, axis=-1, keepdims=True), 1e-12)
        cond = cond * (cfg.cond_scale / norm)
        if cfg.cond_tokens:
            width = cond.shape[-1]
            x = x + _dense(cfg, cfg.hidden, width, name="cond_tokens")(cond.astype(dtype))[:, None]
        if cond.shape[-1] != cfg.hidden:
            cond = _dense(cfg, cfg.hidden, cond.shape[-1], name="cond_proj")(cond)
        c = TimestepEmbedder(cfg, name="t_embed")(t) + cond.astype(dtype)  # [B, D]
        c = nn.Dropout(cfg.cond_dropout, deterministic=not train)(c)

        for i in range(cfg.depth):
            x = DiTBlock(cfg, name=f"block{i}")(x, c)

        shift, scale = jnp.split(
            _dense(cfg, 2 * cfg.hidden, cfg.hidden, "zero", name="final_adaLN")(nn.silu(c)),
            2,
            axis=-1,
        )
        x = _modulate(_layer_norm(cfg, "final_norm")(x), shift, scale)
        x = _dense(cfg, self.out_channels * size, cfg.hidden, "zero", name="patch_out")(x)
        # [B, N, C*S] -> [B, C, N*S]: each channel is its own un-patched vector.
        x = x.reshape(batch, tokens, self.out_channels, size).transpose(0, 2, 1, 3)
        x = x.reshape(batch, self.out_channels, tokens * size)
        return x[:, :, :length].astype(jnp.float32)
