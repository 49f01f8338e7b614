"""What weight-editing baselines need from a host: its MLP output projections, their input keys,
the residual stream, and target log-probabilities from a residual stream onwards.

Axes: B rows, T tokens, D model width, F MLP width, M scored positions per row, V vocabulary.

A host's MLP is `out(act(...))`: Llama's `down(silu(gate x) * up x)`, GPT-J/Phi-2's
`fc_out(gelu(fc_in x))`. The *key* of a token at layer l is the input of that layer's output
projection (kernel [F, D], stacked as `layers/mlp/<down|fc_out>/kernel [L, F, D]`); MEMIT-style
editors write `kernel[l] += delta[F, D]` so that chosen keys map to new values.

Requests arrive tokenised (`EditRows`), so the same code runs on a real tokenizer's output and
on the tiny random models of the parity tests, which have none.
"""

import dataclasses
import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from meg_jax.infra.sharding import replicated
from meg_jax.models.block import Attention
from meg_jax.models.config import LMConfig
from meg_jax.models.decoder import Decoder, DecoderCache, default_positions, init_cache
from meg_jax.models.generate import pad_right
from meg_jax.models.layers import make_norm, mlp_activation

PAD_MULTIPLE = 8  # right-padded widths are rounded up to this: fewer compiled shapes


def out_proj(config: LMConfig) -> str:
    """Name of the MLP output projection: `down` (Llama) or `fc_out` (GPT-J, Phi-2)."""
    return "down" if config.gated_mlp else "fc_out"


def out_kernel(params, config: LMConfig, layer: int) -> jnp.ndarray:
    """Layer `layer`'s MLP output kernel [F, D] (keys in, values out)."""
    return params["layers"]["mlp"][out_proj(config)]["kernel"][layer]


def with_out_kernels(params, config: LMConfig, kernels: dict[int, jnp.ndarray]):
    """A copy of `params` whose output kernels at the given layers are replaced (nothing else is
    copied: the other leaves are shared with `params`)."""
    name = out_proj(config)
    stacked = params["layers"]["mlp"][name]["kernel"]
    for layer, kernel in kernels.items():
        if kernel.shape != stacked.shape[1:]:
            raise ValueError(f"layer {layer}: kernel {kernel.shape}, expected {stacked.shape[1:]}")
        stacked = stacked.at[layer].set(jnp.asarray(kernel, stacked.dtype))
    mlp = {**params["layers"]["mlp"], name: {**params["layers"]["mlp"][name], "kernel": stacked}}
    return {**params, "layers": {**params["layers"], "mlp": mlp}}


@dataclasses.dataclass(frozen=True)
class EditRows:
    """Tokenised rows of some edits: `ids[r]`, the edit it belongs to `owner[r]`, the position of
    its subject's last token `pos[r]`, and optionally target ids scored after the row's prompt
    (`target_start[r]` = index of the first target token in `ids[r]`; 0 when unscored)."""

    ids: tuple[tuple[int, ...], ...]
    owner: tuple[int, ...]
    pos: tuple[int, ...]
    target_start: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, rows: Sequence[int]) -> "EditRows":
        return EditRows(*(tuple(getattr(self, f.name)[r] for r in rows) for f in _ROW_FIELDS))

    def padded(self, pad_id: int):
        """(ids [B, T], mask [B, T]) right-padded numpy arrays."""
        return pad_right(self.ids, pad_id, PAD_MULTIPLE)

    def scored(self, width: int):
        """(positions [B, M], labels [B, M], weights [B, M]) of each row's target tokens: the
        logits at position p predict ids[p + 1]; weights are 1/m on the m real entries."""
        m = max([len(i) - s for i, s in zip(self.ids, self.target_start, strict=True)] + [1])
        m = min(m, width)
        positions = np.zeros((len(self), m), np.int32)
        labels = np.zeros((len(self), m), np.int32)
        weights = np.zeros((len(self), m), np.float32)
        for r, (ids, start) in enumerate(zip(self.ids, self.target_start, strict=True)):
            if start <= 0:
                continue
            n = len(ids) - start
            positions[r, :n] = np.arange(start - 1, start - 1 + n)
            labels[r, :n] = ids[start:]
            weights[r, :n] = 1.0 / n
        return positions, labels, weights


_ROW_FIELDS = dataclasses.fields(EditRows)


# ---- device computations ------------------------------------------------------------------------


def _layer_params(params, layer: int):
    return jax.tree.map(lambda p: p[layer], params["layers"])


def mlp_key(config: LMConfig, layer_params, h, mask) -> jnp.ndarray:
    """The key [B, T, F] (input of the output projection) of one layer, from the residual stream
    h[B, T, D] entering it."""
    positions = jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)
    x = make_norm(config, "input_norm").apply({"params": layer_params["input_norm"]}, h)
    if not config.parallel_residual:  # Llama: the MLP reads the stream after attention
        attn, _ = Attention(config).apply(
            {"params": layer_params["attn"]}, x, positions, mask.astype(bool), None, 0
        )
        x = make_norm(config, "post_attn_norm").apply(
            {"params": layer_params["post_attn_norm"]}, h + attn
        )
    mlp = layer_params["mlp"]
    act = mlp_activation(config)
    if config.gated_mlp:
        return act(x @ mlp["gate"]["kernel"]) * (x @ mlp["up"]["kernel"])
    return act(x @ mlp["fc_in"]["kernel"] + mlp["fc_in"]["bias"])


def _stream(module: Decoder, h, mask, start: int, stop: int):
    """Layers [start, stop) of the decoder on h[B, T, D] (right-padded, no neuron)."""
    mask = mask.astype(bool)
    positions = jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)
    h, _ = module._layers(h, start, stop, positions, mask, None)
    return h


@functools.partial(jax.jit, static_argnames=("config", "layers"))
def keys_at_layers(config: LMConfig, params, ids, mask, layers: tuple[int, ...]):
    """Keys [len(layers), B, T, F] of every token at each of `layers` (one pass up to the last)."""
    model = Decoder(config)
    h = model.apply({"params": params}, ids, method=lambda m, t: m.embed(t))
    out, done = [], 0
    for layer in layers:
        h = model.apply({"params": params}, h, mask, done, layer, method=_stream)
        done = layer
        out.append(mlp_key(config, _layer_params(params, layer), h, mask))
    return jnp.stack(out)


@functools.partial(jax.jit, static_argnames=("config", "stop"))
def stream_before(config: LMConfig, params, ids, mask, stop: int):
    """The residual stream [B, T, D] entering layer `stop` (= leaving layer stop - 1)."""
    return Decoder(config).apply(
        {"params": params}, ids, mask.astype(bool), None, stop, method=Decoder.hidden_before
    )


def _scored_logits(module: Decoder, h, mask, start: int, positions):
    """Logits [B, M, V] at `positions` [B, M] after running layers [start, L) and the head on
    h[B, T, D]; the head runs on the M gathered positions only (a [B, T, V] tensor of SmolLM2's
    49k vocabulary would dominate memory)."""
    h = _stream(module, h, mask, start, module.config.n_layers)
    h = jnp.take_along_axis(h, positions[..., None], axis=1)  # [B, M, D]
    return module._head(h)


def scored_logprobs(config: LMConfig, params, h, mask, start: int, positions, labels):
    """(log p(labels) [B, M], full log-probs [B, M, V]) from the stream entering layer `start`."""
    logits = Decoder(config).apply(
        {"params": params}, h, mask, start, positions, method=_scored_logits
    )
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0], logp


class SuffixRows(NamedTuple):
    """Right-padded rows [R, T] whose residual stream entering layer `start` changes only at a
    slot at or after `split` (P), with what the layers above need to run slots [P, T) alone:
    causal attention lets no earlier slot see a later one, so the keys and values of slots
    [0, P) stay those of the unedited model at every layer above and are computed once, in
    one pass of those layers over the whole rows (`cache`).
    MEMIT's target fitting changes one slot per row, the subject's last token, which in
    template prompts comes after a shared few-shot opening (SmolLM2's two-shot rows: 24 of 48
    slots run; 64 edits' targets 575 s -> 255 s).

    h [R, T - P, D], mask [R, T], cache (layers [start, L), T slots, [0, P) read), split: P,
    at [R]: the changed slot - P, positions [R, M]: the scored slots - P.
    """

    h: jnp.ndarray
    mask: jnp.ndarray
    cache: DecoderCache
    split: jnp.ndarray
    at: jnp.ndarray
    positions: jnp.ndarray


def _cache_from(config: LMConfig, cache: DecoderCache, start: int) -> DecoderCache:
    """The segments of a full cache that `Decoder._layers(.., start, L, ..)` scans: each
    (below, at, above the neuron layer) cut to its layers at or above `start`."""
    k = config.neuron_layer
    below, at, above = cache
    cut = lambda c, n: jax.tree.map(lambda x: x[n:], c)  # noqa: E731
    return (
        cut(below, min(start, k)),
        cut(at, 1 if start > k else 0),
        cut(above, max(start - k - 1, 0)),
    )


@functools.partial(jax.jit, static_argnames=("config", "start"))
def _upper_cache(config: LMConfig, params, h, mask, start: int) -> DecoderCache:
    """Keys and values of layers [start, L) ([.., R, T, ...], segmented as `_cache_from` cuts
    them) of right-padded rows whose stream entering layer `start` is h[R, T, D]."""

    def run(module: Decoder, h, mask):
        cache = _cache_from(config, init_cache(config, *h.shape[:2]), start)
        positions = default_positions(mask)
        _, cache = module._layers(
            h, start, config.n_layers, positions, mask.astype(bool), None, cache, 0
        )
        return cache

    return Decoder(config).apply({"params": params}, h, mask, method=run)


def suffix_rows(config: LMConfig, params, ids, mask, pos, positions, start: int) -> SuffixRows:
    """`SuffixRows` of rows ids[R, T] (numpy, right-padded) whose stream entering layer `start`
    will change at slots pos[R] (numpy) and is scored at positions[R, M] (numpy, >= pos). P is
    the smallest pos rounded down to a multiple of PAD_MULTIPLE (fewer compiled widths)."""
    split = int(np.min(pos)) // PAD_MULTIPLE * PAD_MULTIPLE
    h = stream_before(config, params, ids, mask, start)
    return SuffixRows(
        h[:, split:],
        jnp.asarray(mask),
        _upper_cache(config, params, h, jnp.asarray(mask), start),
        jnp.asarray(split, jnp.int32),
        jnp.asarray(np.asarray(pos) - split, jnp.int32),
        jnp.asarray(np.asarray(positions) - split, jnp.int32),
    )


def _suffix_scored_logits(module: Decoder, rows: SuffixRows, add, start: int):
    """Logits [R, M, V] at rows.positions after adding add[R, D] to the stream at slot rows.at
    and running layers [start, L) on slots [P, T) against the cached earlier slots."""
    cfg = module.config
    width = rows.h.shape[1]
    h = rows.h + jax.nn.one_hot(rows.at, width, dtype=rows.h.dtype)[..., None] * add[:, None]
    slots = jax.lax.dynamic_slice_in_dim(default_positions(rows.mask), rows.split, width, 1)
    h, _ = module._layers(
        h, start, cfg.n_layers, slots, rows.mask.astype(bool), None, rows.cache, rows.split
    )
    return module._head(jnp.take_along_axis(h, rows.positions[..., None], axis=1))


def suffix_logprobs(config: LMConfig, params, rows: SuffixRows, add, labels, start: int):
    """(log p(labels) [R, M], full log-probs [R, M, V]) of `rows` with add[R, D] added at their
    changed slot, from layer `start` on (what `scored_logprobs` gives on the whole rows)."""
    logits = Decoder(config).apply(
        {"params": params}, rows, add, start, method=_suffix_scored_logits
    )
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0], logp


def gather_rows(x: jnp.ndarray, pos: jnp.ndarray) -> jnp.ndarray:
    """x[b, pos[b]] for x[B, T, ...]."""
    return jnp.take_along_axis(x, pos.reshape(-1, *([1] * (x.ndim - 1))), axis=1)[:, 0]


# ---- host-side helpers ---------------------------------------------------------------------------


def on_params_mesh(x, params):
    """`x` replicated on the mesh `params` live on (`x` as is when they have none).

    A loop that feeds a compiled step's output back into it (Adam on MEMIT's deltas) must give
    the first call the sharding the step returns: a fresh array has none, the output has the
    mesh's, and the second call would compile the whole program again (15-35 s on SmolLM2).
    """
    sharding = jax.tree.leaves(params)[0].sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.device_put(x, replicated(sharding.mesh))
    return x


def row_batches(n: int, batch: int):
    for start in range(0, n, batch):
        yield list(range(start, min(n, start + batch)))


def mean_keys(
    config: LMConfig, params, rows: EditRows, layer: int, n_edits: int, batch: int = 64
) -> np.ndarray:
    """Per edit the key [E, F] at its subject's last token at `layer`, averaged over its rows
    (MEMIT averages the key over the context prefixes), float64."""
    total = np.zeros((n_edits, config.d_ff))
    count = np.zeros(n_edits)
    for idx in row_batches(len(rows), batch):
        part = rows.select(idx)
        ids, mask = part.padded(config.pad_token_id)
        keys = keys_at_layers(config, params, ids, mask, (layer,))[0]
        at = np.asarray(gather_rows(keys, jnp.asarray(part.pos)), np.float64)
        np.add.at(total, np.asarray(part.owner), at)
        np.add.at(count, np.asarray(part.owner), 1)
    if np.any(count == 0):
        raise ValueError(f"edits {np.flatnonzero(count == 0)[:10].tolist()} have no rows")
    return total / count[:, None]


def residual_at(
    config: LMConfig, params, rows: EditRows, layer: int, batch: int = 64
) -> np.ndarray:
    """The residual stream [B, D] leaving `layer` at each row's subject position, float64."""
    out = []
    for idx in row_batches(len(rows), batch):
        part = rows.select(idx)
        ids, mask = part.padded(config.pad_token_id)
        h = stream_before(config, params, ids, mask, layer + 1)
        out.append(np.asarray(gather_rows(h, jnp.asarray(part.pos)), np.float64))
    return np.concatenate(out)
