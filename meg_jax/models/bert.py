"""A pure-functional Flax BERT encoder (post-LayerNorm, absolute positions, exact GELU).

Axes: B batch, T tokens, Q query tokens (T, or 1 for a [CLS]-only layer), D model width,
H heads, K head dim, F MLP width, L layers.

Parameters (a plain pytree):
    embeddings/{word,position,token_type}/embedding, embeddings/norm/{scale,bias};
    layers/<BertLayer params with a leading axis of n_frozen_layers>;
    top_layers/<BertLayer params with a leading axis of n_top_layers>   (when n_top_layers > 0).

Identical layers are stacked and run with `lax.scan`, so compile time does not grow with depth.
The last `n_top_layers` layers are a separate subtree: the InfoNCE stage differentiates only
with respect to `top_layers`, and runs the frozen part (`frozen_hidden`) once per text, outside
the gradient. Checkpoints always hold one stack; `split_top_layers` re-cuts it.

MeG needs only the [CLS] vector, and in the last layer only the [CLS] query reaches it: the
`cls*` methods run that layer for one query position (keys and values still see every token),
which is exact and saves most of the last layer's cost (the InfoNCE step is mostly that layer).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from meg_jax.models.bert_config import BertConfig


def _dense(features: int, config: BertConfig, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=config.jnp_dtype, param_dtype=config.jnp_dtype, name=name)


def _norm(config: BertConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=config.norm_eps, dtype=config.jnp_dtype, param_dtype=config.jnp_dtype, name=name
    )


class BertLayer(nn.Module):
    """Self-attention and MLP, each followed by residual add and LayerNorm (post-LN)."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray, key_mask: jnp.ndarray, cls_only: bool = False):
        """x[B, T, D], key_mask[B, T] (True = real token) -> [B, Q, D], Q = 1 if `cls_only`."""
        cfg = self.config
        b, t, d = x.shape
        h, k = cfg.n_heads, cfg.head_dim
        queries = x[:, :1] if cls_only else x  # [B, Q, D]
        q = _dense(d, cfg, "q")(queries).reshape(b, -1, h, k)
        keys = _dense(d, cfg, "k")(x).reshape(b, t, h, k)
        values = _dense(d, cfg, "v")(x).reshape(b, t, h, k)
        # Scores and softmax in float32 so that half-precision runs stay close to float32 ones.
        scores = jnp.einsum(
            "bqhk,bshk->bhqs", q.astype(jnp.float32), keys.astype(jnp.float32)
        )  # [B, H, Q, T]
        scores = scores / math.sqrt(k)
        scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
        context = jnp.einsum("bhqs,bshk->bqhk", probs, values).reshape(b, -1, d)  # [B, Q, D]
        attended = _norm(cfg, "attn_norm")(queries + _dense(d, cfg, "o")(context))
        hidden = jax.nn.gelu(_dense(cfg.d_ff, cfg, "fc_in")(attended), approximate=False)
        return _norm(cfg, "mlp_norm")(attended + _dense(d, cfg, "fc_out")(hidden))


class BertEmbeddings(nn.Module):
    """Word + absolute position + token-type embeddings, then LayerNorm."""

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids: jnp.ndarray, token_type_ids: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config

        def embed(n: int, name: str) -> nn.Embed:
            return nn.Embed(
                n, cfg.d_model, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_dtype, name=name
            )

        positions = jnp.arange(input_ids.shape[1])[None, :]  # [1, T]; right padding keeps 0..T-1
        x = embed(cfg.vocab_size, "word")(input_ids)
        x = x + embed(cfg.max_position, "position")(positions)
        x = x + embed(cfg.type_vocab_size, "token_type")(token_type_ids)
        return _norm(cfg, "norm")(x)


class Bert(nn.Module):
    """BERT encoder; `__call__` gives `last_hidden_state`, the `cls*` methods the [CLS] vector."""

    config: BertConfig

    def setup(self):
        cfg = self.config
        self.embeddings = BertEmbeddings(cfg)
        self.layers = self.param("layers", self._init_stack, cfg.n_frozen_layers)
        if cfg.n_top_layers:
            self.top_layers = self.param("top_layers", self._init_stack, cfg.n_top_layers)

    def _init_stack(self, rng, n_layers: int):
        x = jnp.zeros((1, 1, self.config.d_model), self.config.jnp_dtype)
        mask = jnp.ones((1, 1), bool)
        layer = BertLayer(self.config, parent=None)
        return jax.vmap(lambda r: layer.init(r, x, mask)["params"])(jax.random.split(rng, n_layers))

    def _stack(self, h, key_mask, params, cls_only_last: bool):
        """Runs a stacked layer tree on h[B, T, D]; the last layer [CLS]-only if asked."""
        layer = BertLayer(self.config, parent=None)

        def body(carry, layer_params):
            return layer.apply({"params": layer_params}, carry, key_mask), None

        if not cls_only_last:
            return jax.lax.scan(body, h, params)[0]
        h = jax.lax.scan(body, h, jax.tree.map(lambda p: p[:-1], params))[0]
        last = jax.tree.map(lambda p: p[-1], params)
        return layer.apply({"params": last}, h, key_mask, cls_only=True)

    def _top(self, h, key_mask, cls_only_last: bool):
        if not self.config.n_top_layers:
            return h
        return self._stack(h, key_mask, self.top_layers, cls_only_last)

    @staticmethod
    def _inputs(input_ids, attention_mask, token_type_ids):
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        return attention_mask.astype(bool), token_type_ids

    # ---- public entry points (use with `model.apply(variables, ..., method=...)`) -------------

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None):
        """last_hidden_state [B, T, D] for input_ids[B, T] (attention_mask: 1 = real token)."""
        key_mask, types = self._inputs(input_ids, attention_mask, token_type_ids)
        h = self._stack(self.embeddings(input_ids, types), key_mask, self.layers, False)
        return self._top(h, key_mask, False)

    def frozen_hidden(self, input_ids, attention_mask=None, token_type_ids=None):
        """Hidden states [B, T, D] after the frozen layers (the input of `top_layers`)."""
        key_mask, types = self._inputs(input_ids, attention_mask, token_type_ids)
        return self._stack(self.embeddings(input_ids, types), key_mask, self.layers, False)

    def cls_from_frozen(self, hidden, attention_mask):
        """[CLS] vectors [B, D] from `frozen_hidden`'s output; the trainable part of the model."""
        key_mask = attention_mask.astype(bool)
        if not self.config.n_top_layers:
            return hidden[:, 0]
        return self._top(hidden, key_mask, True)[:, 0]

    def cls(self, input_ids, attention_mask=None, token_type_ids=None):
        """[CLS] vectors [B, D] of `last_hidden_state`, computed without the unused positions."""
        key_mask, types = self._inputs(input_ids, attention_mask, token_type_ids)
        h = self.embeddings(input_ids, types)
        h = self._stack(h, key_mask, self.layers, not self.config.n_top_layers)
        return self._top(h, key_mask, True)[:, 0]


def split_top_layers(params: dict, n_top_layers: int) -> dict:
    """Moves the last `n_top_layers` of a single `layers` stack into `top_layers`."""
    params = dict(params)
    if "top_layers" in params:
        raise ValueError("params are already split (they have top_layers)")
    if n_top_layers:
        stack = params["layers"]
        params["layers"] = jax.tree.map(lambda p: p[:-n_top_layers], stack)
        params["top_layers"] = jax.tree.map(lambda p: p[-n_top_layers:], stack)
    return params


def merge_top_layers(params: dict) -> dict:
    """The inverse of `split_top_layers`: one `layers` stack holding every layer."""
    params = dict(params)
    top = params.pop("top_layers", None)
    if top is not None:
        params["layers"] = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), params["layers"], top)
    return params
