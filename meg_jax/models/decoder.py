"""The host LLM: a pure-functional Flax decoder with stacked layers and the dynamic-neuron patch.

Axes: B batch, T tokens, S KV-cache slots, D model width, V vocabulary, L layers.

Parameters (a plain pytree):
    embed/embedding [V, D]; layers/<Block params with a leading L axis>; final_norm/...;
    lm_head/{kernel [D, V], bias [V]} unless the embeddings are tied.

The L layers are one stacked pytree run with `lax.scan`, so compile time does not grow with
depth. The layer that carries the neuron (`config.neuron_layer`) is run on its own between two
scans: the scanned body never sees a neuron, and the neuron layer's inputs and outputs are
reachable for split execution (`hidden_before` / `logits_from`), which weight collection uses to
run the frozen prefix once and only the suffix at every optimisation step.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from meg_jax.models.block import Block, LayerCache
from meg_jax.models.config import LMConfig
from meg_jax.models.layers import make_norm
from meg_jax.models.neuron import Neuron

# A KV cache: one stacked LayerCache per segment (layers below, at, and above the neuron layer).
DecoderCache = tuple[LayerCache, LayerCache, LayerCache]


def default_positions(attention_mask: jnp.ndarray) -> jnp.ndarray:
    """Positions [B, T] that count only real tokens, so left padding does not shift them (as HF)."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


class Decoder(nn.Module):
    """GPT-J, Phi-2 or Llama-family causal LM, as chosen by `config.arch`."""

    config: LMConfig

    def setup(self):
        cfg = self.config
        self.embed = nn.Embed(
            cfg.vocab_size, cfg.d_model, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_dtype
        )
        self.layers = self.param("layers", self._init_layers)
        self.final_norm = make_norm(cfg, "final_norm")
        if not cfg.tie_embeddings:
            self.lm_head = nn.Dense(
                cfg.vocab_size,
                use_bias=cfg.lm_head_bias,
                dtype=cfg.jnp_dtype,
                param_dtype=cfg.jnp_dtype,
            )

    def _init_layers(self, rng):
        cfg = self.config
        x = jnp.zeros((1, 1, cfg.d_model), cfg.jnp_dtype)
        pos = jnp.zeros((1, 1), jnp.int32)
        mask = jnp.ones((1, 1), bool)
        block = Block(cfg, parent=None)
        rngs = jax.random.split(rng, cfg.n_layers)
        return jax.vmap(lambda r: block.init(r, x, pos, mask)["params"])(rngs)

    # ---- pieces -------------------------------------------------------------------------------

    def _run(self, h, start, stop, positions, key_mask, cache, cache_index, neuron):
        """Layers [start, stop) on h[B, T, D]; returns (h, new cache stack or None)."""
        if stop <= start:
            return h, cache
        block = Block(self.config, parent=None)

        def layer_params(i):
            # Index the full stack per layer rather than slicing [start, stop) out of it first:
            # XLA materialises such a slice, a copy of the segment's weights on every forward
            # pass and every decoding step (on CPU it doubled SmolLM2's weight traffic).
            return jax.tree.map(
                lambda p: jax.lax.dynamic_index_in_dim(p, i, keepdims=False), self.layers
            )

        if neuron is not None:  # a single layer, the neuron layer
            layer_cache = jax.tree.map(lambda c: c[0], cache) if cache is not None else None
            h, written = block.apply(
                {"params": layer_params(start)},
                h,
                positions,
                key_mask,
                layer_cache,
                cache_index,
                neuron,
            )
            if written is not None:
                written = jax.tree.map(lambda c: c[None], written)
        else:

            def body(carry, xs):
                index, layer_cache = xs
                return block.apply(
                    {"params": layer_params(index)},
                    carry,
                    positions,
                    key_mask,
                    layer_cache,
                    cache_index,
                )

            h, written = jax.lax.scan(body, h, (jnp.arange(start, stop), cache))
        if cache is None:
            return h, None
        # The layers return only the entries they wrote ([L, B, T, N, K]); one update of the
        # stacked cache then happens in place (inside a decoding loop, with no copy).
        start_slot = (0, 0, cache_index, 0, 0)
        return h, jax.tree.map(
            lambda c, w: jax.lax.dynamic_update_slice(c, w, start_slot), cache, written
        )

    def _segments(self, start: int, stop: int):
        """Splits [start, stop) into (below, at, above) the neuron layer; empty pieces kept."""
        k = self.config.neuron_layer
        below = (start, min(stop, k))
        at = (max(start, k), min(stop, k + 1))
        above = (max(start, k + 1), stop)
        return below, at, above

    def _layers(self, h, start, stop, positions, key_mask, neuron, cache=None, cache_index=0):
        caches = cache if cache is not None else (None, None, None)
        new_caches = []
        for (a, b), seg_cache, seg_neuron in zip(
            self._segments(start, stop), caches, (None, neuron, None), strict=True
        ):
            h, seg_cache = self._run(
                h, a, b, positions, key_mask, seg_cache, cache_index, seg_neuron
            )
            new_caches.append(seg_cache)
        return h, (tuple(new_caches) if cache is not None else None)

    def _head(self, h: jnp.ndarray) -> jnp.ndarray:
        h = self.final_norm(h)
        if self.config.tie_embeddings:
            return self.embed.attend(h)
        return self.lm_head(h)

    @staticmethod
    def _mask_and_positions(tokens, attention_mask, positions):
        if attention_mask is None:
            attention_mask = jnp.ones(tokens.shape, bool)
        attention_mask = attention_mask.astype(bool)
        if positions is None:
            positions = default_positions(attention_mask)
        return attention_mask, positions

    # ---- public entry points (use with `model.apply(params, ..., method=...)`) -----------------

    def __call__(self, tokens, attention_mask=None, positions=None, neuron: Neuron | None = None):
        """Logits [B, T, V] for tokens[B, T]; `neuron` patches `config.neuron_layer`."""
        attention_mask, positions = self._mask_and_positions(tokens, attention_mask, positions)
        h = self.embed(tokens)
        h, _ = self._layers(h, 0, self.config.n_layers, positions, attention_mask, neuron)
        return self._head(h)

    def last_logits(self, tokens, attention_mask, neuron: Neuron | None = None):
        """Logits [B, V] at each row's last real token of a right-padded batch tokens[B, T].

        The head runs on those B positions only, not on all B * T (a fifth of a SmolLM2 forward).
        """
        attention_mask, positions = self._mask_and_positions(tokens, attention_mask, None)
        h, _ = self._layers(
            self.embed(tokens), 0, self.config.n_layers, positions, attention_mask, neuron
        )
        last = jnp.sum(attention_mask, axis=1).astype(jnp.int32) - 1  # [B]
        return self._head(jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0])

    def hidden_before(self, tokens, attention_mask=None, positions=None, stop: int | None = None):
        """The residual stream [B, T, D] entering layer `stop` (default: the neuron layer)."""
        stop = self.config.neuron_layer if stop is None else stop
        attention_mask, positions = self._mask_and_positions(tokens, attention_mask, positions)
        h, _ = self._layers(self.embed(tokens), 0, stop, positions, attention_mask, None)
        return h

    def logits_from(
        self, hidden, attention_mask, positions=None, neuron=None, start: int | None = None
    ):
        """Logits [B, T, V] from the residual stream entering layer `start` (default: neuron's)."""
        start = self.config.neuron_layer if start is None else start
        attention_mask, positions = self._mask_and_positions(
            hidden[..., 0], attention_mask, positions
        )
        h, _ = self._layers(hidden, start, self.config.n_layers, positions, attention_mask, neuron)
        return self._head(h)

    def logits_from_at(
        self, hidden, attention_mask, index, positions=None, neuron=None, start: int | None = None
    ):
        """Logits [B, A, V] at positions index[B, A] only, from the residual stream entering layer
        `start` (default: the neuron layer's).

        The layers still run every position (later positions attend to earlier ones); only the
        final norm and the [D, V] head, a large share of a small model's step, skip the others.
        Weight collection needs the logits at the few answer positions of each row.
        """
        start = self.config.neuron_layer if start is None else start
        attention_mask, positions = self._mask_and_positions(
            hidden[..., 0], attention_mask, positions
        )
        h, _ = self._layers(hidden, start, self.config.n_layers, positions, attention_mask, neuron)
        return self._head(jnp.take_along_axis(h, index[..., None], axis=1))

    def decode(
        self,
        tokens,
        cache: DecoderCache,
        cache_index,
        key_mask,
        positions,
        neuron=None,
        last_only: bool = False,
    ):
        """Writes tokens[B, T] at slots [cache_index, cache_index + T); returns (logits, cache).

        `key_mask[B, S]` marks which cache slots hold real tokens (left padding is masked out).
        `last_only` returns logits [B, 1, V] of the last slot only: a prompt pass that just needs
        the next token skips the [B, T, D] x [D, V] head product (a fifth of a SmolLM2 prompt).
        """
        h = self.embed(tokens)
        h, cache = self._layers(
            h, 0, self.config.n_layers, positions, key_mask, neuron, cache, cache_index
        )
        if last_only:
            h = h[:, -1:]
        return self._head(h), cache

    def prefill_with_prefix(self, prefix, tokens, cache: DecoderCache, key_mask, positions, neuron):
        """The prompt pass of rows that all open with prefix[P] and go on with tokens[B, T]
        (left-padded): (logits [B, 1, V] at the last slot, cache with slots [0, P + T) written).

        `key_mask` [B, S] and `positions` [B, P + T] cover prefix and tokens. Below the neuron
        layer nothing depends on the row, so those layers run the prefix once, at batch 1, and
        every row's cache gets its keys and values; from the neuron layer up the neuron acts on
        the prefix too, so every row runs it there. Without a neuron, no layer depends on the
        row and the prefix runs once through all of them.
        """
        cfg = self.config
        k = cfg.n_layers if neuron is None else cfg.neuron_layer  # layers shared by all rows
        batch, p = tokens.shape[0], prefix.shape[0]
        h_prefix, prefix_cache = self._layers(
            self.embed(prefix[None]),
            0,
            k,
            positions[:1, :p],
            jnp.ones((1, p), bool),
            None,
            init_cache(cfg, 1, p),
        )

        def share(row_cache, one):  # [L, B, S, N, K] <- [L, 1, P, N, K] at slots [0, P)
            shared = jnp.broadcast_to(one, (one.shape[0], batch, *one.shape[2:]))
            return jax.lax.dynamic_update_slice(row_cache, shared, (0, 0, 0, 0, 0))

        cache = jax.tree.map(share, cache, prefix_cache)  # layers above k: rewritten below
        h, cache = self._layers(
            self.embed(tokens), 0, k, positions[:, p:], key_mask, None, cache, cache_index=p
        )
        if k < cfg.n_layers:
            h_prefix = jnp.broadcast_to(h_prefix, (batch, *h_prefix.shape[1:]))
            h = jnp.concatenate([h_prefix, h], axis=1)
            h, cache = self._layers(h, k, cfg.n_layers, positions, key_mask, neuron, cache, 0)
        return self._head(h[:, -1:]), cache


def init_cache(config: LMConfig, batch: int, length: int) -> DecoderCache:
    """An all-zero KV cache for `length` slots, split by segment around the neuron layer."""
    k = config.neuron_layer

    def stack(n_layers: int) -> LayerCache:
        shape = (n_layers, batch, length, config.n_kv_heads, config.head_dim)
        return LayerCache(jnp.zeros(shape, config.jnp_dtype), jnp.zeros(shape, config.jnp_dtype))

    return stack(k), stack(1), stack(config.n_layers - k - 1)
