"""Batched greedy decoding with a KV cache, carrying each example's neuron through every step.

Axes: B batch, P shared prefix tokens, T prompt tokens (left-padded), N new tokens,
S = P + T + N cache slots, D model width, V vocabulary.

The prompt fills the cache in one jitted forward pass, then a jitted `lax.while_loop` runs one
single-token step until every row has produced a stop token or N tokens. Prompts are left-padded
so that every row's next token lands in the same cache slot; positions count only real tokens, so
padding changes nothing (as HF's `generate`). `greedy_generate` is a host-side loop over these
jitted pieces (call it outside `jit`).

Shared prefix (`prefix`): when every prompt opens with the same tokens (a template's fixed text),
they sit in slots [0, P) of every row and the layers below the neuron layer (all layers when
there is no neuron) run them once for the batch (`Decoder.prefill_with_prefix`).

Compaction (`min_rows`): a batch keeps stepping until its slowest row ends, and on a
compute-bound device every finished row still costs a full row of work per step. So the loop
also pauses once half the rows or more have stopped; the rows still running (their cache, mask,
positions and neuron) are gathered into the smallest of B/2, B/4, ... that holds them, and
decoding goes on there. Each row computes exactly what it would have in the full batch.
"""

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from meg_jax.models.config import LMConfig
from meg_jax.models.decoder import Decoder, DecoderCache, default_positions, init_cache
from meg_jax.models.neuron import Neuron


def left_pad(
    sequences: Sequence[Sequence[int]], pad_id: int, length: int | None = None, bucket: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens[B, T], mask[B, T]) with T the longest row rounded up to a multiple of `bucket`.

    Rounding keeps the number of distinct compiled shapes small across batches.
    """
    longest = max(len(s) for s in sequences)
    if length is None:
        length = -(-longest // bucket) * bucket
    if longest > length:
        raise ValueError(f"a prompt has {longest} tokens, more than the padded length {length}")
    tokens = np.full((len(sequences), length), pad_id, np.int32)
    mask = np.zeros((len(sequences), length), bool)
    for row, seq in enumerate(sequences):
        if len(seq):
            tokens[row, length - len(seq) :] = seq
            mask[row, length - len(seq) :] = True
    return tokens, mask


def pad_right(
    sequences: Sequence[Sequence[int]], pad_id: int, multiple_of: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ids [B, T] int32 and mask [B, T] int32; T rounded up to `multiple_of`
    (fewer distinct shapes, so fewer recompilations of a jitted model)."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("cannot pad an empty batch or an empty sequence")
    longest = max(len(s) for s in sequences)
    width = -(-longest // multiple_of) * multiple_of
    ids = np.full((len(sequences), width), pad_id, dtype=np.int32)
    mask = np.zeros((len(sequences), width), dtype=np.int32)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    return ids, mask


class DecodeState(NamedTuple):
    """A batch of B rows in the middle of greedy decoding (S = T + N cache slots)."""

    step: jnp.ndarray  # [] new tokens produced so far, the same for every row
    token: jnp.ndarray  # [B] the last token produced
    done: jnp.ndarray  # [B] the row has produced a stop token
    out: jnp.ndarray  # [B, N] new tokens so far; `pad_token_id` after a stop and beyond `step`
    cache: DecoderCache
    key_mask: jnp.ndarray  # [B, S] the cache slots holding real tokens
    pos: jnp.ndarray  # [B] the position of the next token
    neuron: Neuron | None  # [B, D] rows


def _is_stop(token: jnp.ndarray, stop_ids: tuple[int, ...]) -> jnp.ndarray:
    if not stop_ids:
        return jnp.zeros(token.shape, bool)
    return jnp.any(token[:, None] == jnp.asarray(stop_ids, jnp.int32)[None, :], axis=-1)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "stop_ids"))
def _prefill(config, params, prefix, tokens, attention_mask, neuron, *, max_new_tokens, stop_ids):
    """The prompt pass: the cache filled and the first new token of every row, as a state.

    prefix [P] (P may be 0) opens every row; tokens [B, T] are the rest, left-padded.
    """
    batch = tokens.shape[0]
    mask = jnp.concatenate(
        [jnp.ones((batch, prefix.shape[0]), bool), attention_mask.astype(bool)], axis=1
    )  # [B, P + T]
    key_mask = jnp.concatenate([mask, jnp.zeros((batch, max_new_tokens), bool)], axis=1)
    cache = init_cache(config, batch, mask.shape[1] + max_new_tokens)
    model, variables, positions = Decoder(config), {"params": params}, default_positions(mask)
    if prefix.shape[0]:
        logits, cache = model.apply(
            variables,
            prefix,
            tokens,
            cache,
            key_mask,
            positions,
            neuron,
            method=Decoder.prefill_with_prefix,
        )
    else:
        logits, cache = model.apply(
            variables,
            tokens,
            cache,
            0,
            key_mask,
            positions,
            neuron,
            last_only=True,
            method=Decoder.decode,
        )
    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)  # [B]
    out = jnp.full((batch, max_new_tokens), config.pad_token_id, jnp.int32).at[:, 0].set(first)
    next_pos = jnp.sum(mask, axis=1).astype(jnp.int32)  # [B] position of the first new token
    done = _is_stop(first, stop_ids)
    return DecodeState(jnp.int32(1), first, done, out, cache, key_mask, next_pos, neuron)


@functools.partial(jax.jit, static_argnames=("config", "stop_ids", "pause_at"))
def _decode(config, params, state: DecodeState, *, stop_ids, pause_at: int) -> DecodeState:
    """Steps until every row is done, N tokens exist, or at most `pause_at` rows are running."""
    model = Decoder(config)
    max_new_tokens = state.out.shape[1]
    prompt_len = state.key_mask.shape[1] - max_new_tokens

    def cond(state):
        running = jnp.sum(~state.done)
        return (state.step < max_new_tokens) & (running > 0) & (running > pause_at)

    def body(state):
        step, token, done, out, cache, key_mask, pos, neuron = state
        slot = prompt_len + step - 1
        key_mask = key_mask.at[:, slot].set(True)
        logits, cache = model.apply(
            {"params": params},
            token[:, None],
            cache,
            slot,
            key_mask,
            pos[:, None],
            neuron,
            method=Decoder.decode,
        )
        new = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        new = jnp.where(done, config.pad_token_id, new)
        out = out.at[:, step].set(new)
        done = done | _is_stop(new, stop_ids)
        return DecodeState(step + 1, new, done, out, cache, key_mask, pos + 1, neuron)

    return jax.lax.while_loop(cond, body, state)


@jax.jit
def _take_rows(state: DecodeState, rows: jnp.ndarray) -> DecodeState:
    """The state of `rows` [B'] only (cache leaves carry a leading layer axis)."""
    take = functools.partial(jnp.take, indices=rows, axis=0)
    return state._replace(
        token=take(state.token),
        done=take(state.done),
        out=take(state.out),
        cache=jax.tree.map(functools.partial(jnp.take, indices=rows, axis=1), state.cache),
        key_mask=take(state.key_mask),
        pos=take(state.pos),
        neuron=jax.tree.map(take, state.neuron),
    )


def greedy_generate(
    config: LMConfig,
    params,
    tokens: jnp.ndarray,
    attention_mask: jnp.ndarray,
    neuron: Neuron | None = None,
    *,
    max_new_tokens: int = 20,
    stop_ids: tuple[int, ...] = (),
    min_rows: int = 0,
    prefix: Sequence[int] = (),
) -> jax.Array:
    """New tokens [B, N]: greedy continuations; after a stop token, rows hold `pad_token_id`.

    The stop token itself is kept (as HF `generate`), so callers can tell a stop from the bound.
    `min_rows` > 0 compacts (module docstring) into batches of B/2, B/4, ... down to `min_rows`
    rows (the smallest that holds the running rows), each size one more compiled program; 0
    runs the whole batch to the end.
    `prefix`: token ids that open every row, before its `tokens` (e.g. a prompt template's
    fixed opening); the layers below the neuron layer (all of them when `neuron` is None) run
    them once for the whole batch.
    """
    stop_ids = tuple(int(i) for i in stop_ids)
    state = _prefill(
        config,
        params,
        jnp.asarray(prefix, jnp.int32).reshape(-1),
        tokens,
        attention_mask,
        neuron,
        max_new_tokens=max_new_tokens,
        stop_ids=stop_ids,
    )
    rows = np.arange(tokens.shape[0])  # the caller's row of each state row
    out = None
    while True:
        half = len(rows) // 2
        can_halve = min_rows > 0 and half >= min_rows
        state = _decode(config, params, state, stop_ids=stop_ids, pause_at=half if can_halve else 0)
        if not can_halve:
            break
        done = _to_host(state.done)
        if done.all() or int(state.step) >= max_new_tokens:
            break
        if out is None:
            out = np.full((tokens.shape[0], max_new_tokens), config.pad_token_id, np.int32)
        out[rows] = _to_host(state.out)  # final for the finished rows
        running = np.flatnonzero(~done)
        size = half  # the smallest of B/2, B/4, ... (not below min_rows) that holds them
        while size // 2 >= max(min_rows, len(running)):
            size //= 2
        # Fill the smaller batch with copies of a finished row (at least half the rows are):
        # they count as done, so the next pause sees only real running rows, and their tokens
        # (all final) are what that row already holds.
        filler = np.repeat(np.flatnonzero(done)[:1], size - len(running))
        keep = np.concatenate([running, filler])
        state = _take_rows(state, keep)  # numpy: a value every process holds whole
        rows = rows[keep]
    if out is None:
        return state.out
    out[rows] = _to_host(state.out)
    return jnp.asarray(out)


def _to_host(x: jax.Array) -> np.ndarray:
    """`x` whole as numpy. A batch split over the devices of several processes (a mesh that
    spans hosts) is gathered from all of them: collective, every process calls it alike."""
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
