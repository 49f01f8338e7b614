"""One transformer layer of the host LLM, with the optional per-example dynamic neuron.

Axes: B batch, T query tokens, S key slots (T, or the KV-cache length), D model width,
H query heads, G query heads per KV head, N KV heads, K head dim, F MLP width.

Attention works on *slots*: a query written at slot `cache_index + t` sees the key slots at or
before it whose `key_mask` is set. Without a cache the slots are just 0..T-1; with one, the same
rule gives causal decoding over a left-padded batch.
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from meg_jax.models.config import LMConfig
from meg_jax.models.layers import apply_rotary, make_norm, mlp_activation
from meg_jax.models.neuron import Neuron


class LayerCache(NamedTuple):
    """Keys and values, each [B, S, N, K] for a cache (stacks add a layer axis), or [B, T, N, K]
    for the entries one call writes."""

    k: jnp.ndarray
    v: jnp.ndarray


def _dense(features: int, use_bias: bool, config: LMConfig, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=config.jnp_dtype,
        param_dtype=config.jnp_dtype,
        name=name,
    )


class Attention(nn.Module):
    """Multi-head (grouped-query) self-attention with rotary positions and an optional KV cache."""

    config: LMConfig

    @nn.compact
    def __call__(self, x, positions, key_mask, cache: LayerCache | None, cache_index):
        cfg = self.config
        b, t, _ = x.shape
        q = _dense(cfg.n_heads * cfg.head_dim, cfg.qkv_bias, cfg, "q")(x)
        k = _dense(cfg.n_kv_heads * cfg.head_dim, cfg.qkv_bias, cfg, "k")(x)
        v = _dense(cfg.n_kv_heads * cfg.head_dim, cfg.qkv_bias, cfg, "v")(x)
        q = apply_rotary(q.reshape(b, t, cfg.n_heads, cfg.head_dim), positions, cfg)
        k = apply_rotary(k.reshape(b, t, cfg.n_kv_heads, cfg.head_dim), positions, cfg)
        v = v.reshape(b, t, cfg.n_kv_heads, cfg.head_dim)

        if cache is not None:
            # Only the new entries leave the layer: the caller writes them into the stacked cache
            # in place, where returning whole updated caches would copy every layer's cache on
            # every decoding step.
            written = LayerCache(k.astype(cache.k.dtype), v.astype(cache.v.dtype))
            start = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(cache.k, written.k, start)
            v = jax.lax.dynamic_update_slice(cache.v, written.v, start)
        else:
            written = None
        s = k.shape[1]

        groups = cfg.n_heads // cfg.n_kv_heads
        q = q.reshape(b, t, cfg.n_kv_heads, groups, cfg.head_dim)
        # Scores in float32 (as HF does for GPT-J, and for stability in half precision).
        scores = jnp.einsum(
            "btngk,bsnk->bngts", q.astype(jnp.float32), k.astype(jnp.float32)
        )  # [B, N, G, T, S]
        scores = scores / jnp.sqrt(jnp.float32(cfg.head_dim))
        query_slot = cache_index + jnp.arange(t)  # [T]
        causal = jnp.arange(s)[None, :] <= query_slot[:, None]  # [T, S]
        allowed = causal[None] & key_mask[:, None, :]  # [B, T, S]
        scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bngts,bsnk->btngk", probs, v)  # [B, T, N, G, K]
        out = out.reshape(b, t, cfg.n_heads * cfg.head_dim)
        return _dense(cfg.d_model, cfg.out_proj_bias, cfg, "o")(out), written


def neuron_contribution(x: jnp.ndarray, neuron: Neuron, activation) -> jnp.ndarray:
    """act(x . w_in + b_in) * w_out at every position: x[B, T, D] -> [B, T, D]."""
    pre = jnp.einsum("btd,bd->bt", x, neuron.w_in.astype(x.dtype))  # [B, T]
    pre = pre + neuron.b_in.astype(x.dtype)[:, None]
    return activation(pre)[..., None] * neuron.w_out.astype(x.dtype)[:, None, :]


class MLP(nn.Module):
    """The family's MLP; the dynamic neuron is one more hidden unit of it when given."""

    config: LMConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray, neuron: Neuron | None) -> jnp.ndarray:
        cfg = self.config
        act = mlp_activation(cfg)
        if cfg.gated_mlp:
            gate = _dense(cfg.d_ff, False, cfg, "gate")(x)
            up = _dense(cfg.d_ff, False, cfg, "up")(x)
            out = _dense(cfg.d_model, False, cfg, "down")(act(gate) * up)
        else:
            hidden = act(_dense(cfg.d_ff, cfg.mlp_bias, cfg, "fc_in")(x))
            out = _dense(cfg.d_model, cfg.mlp_bias, cfg, "fc_out")(hidden)
        if neuron is not None:
            neuron_act = act if cfg.neuron_activation == "model" else (lambda z: z)
            out = out + neuron_contribution(x, neuron, neuron_act)
        return out


class Block(nn.Module):
    """A decoder layer: sequential residual (Llama) or parallel attention + MLP (GPT-J, Phi-2)."""

    config: LMConfig

    @nn.compact
    def __call__(
        self,
        x: jnp.ndarray,
        positions: jnp.ndarray,
        key_mask: jnp.ndarray,
        cache: LayerCache | None = None,
        cache_index: jnp.ndarray | int = 0,
        neuron: Neuron | None = None,
    ) -> tuple[jnp.ndarray, LayerCache | None]:
        cfg = self.config
        normed = make_norm(cfg, "input_norm")(x)
        attn, written = Attention(cfg, name="attn")(normed, positions, key_mask, cache, cache_index)
        mlp = MLP(cfg, name="mlp")
        if cfg.parallel_residual:
            return x + attn + mlp(normed, neuron), written
        x = x + attn
        return x + mlp(make_norm(cfg, "post_attn_norm")(x), neuron), written
