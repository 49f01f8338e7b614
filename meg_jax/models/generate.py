"""Batched greedy decoding with a KV cache, carrying each example's neuron through every step.

Axes: B batch, T prompt tokens (left-padded), N new tokens, S = T + N cache slots, V vocabulary.

One jitted function per (config, T, N, stop ids): the prompt fills the cache in one forward pass,
then a `lax.while_loop` runs one compiled single-token step until every row has produced a stop
token or N tokens. Prompts are left-padded so that every row's next token lands in the same cache
slot; positions count only real tokens, so padding changes nothing (as HF's `generate`).
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from meg_jax.models.config import LMConfig
from meg_jax.models.decoder import Decoder, default_positions, init_cache
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


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "stop_ids"))
def greedy_generate(
    config: LMConfig,
    params,
    tokens: jnp.ndarray,
    attention_mask: jnp.ndarray,
    neuron: Neuron | None = None,
    *,
    max_new_tokens: int = 20,
    stop_ids: tuple[int, ...] = (),
) -> jnp.ndarray:
    """New tokens [B, N]: greedy continuations; after a stop token, rows hold `pad_token_id`.

    The stop token itself is kept (as HF `generate`), so callers can tell a stop from the bound.
    """
    model = Decoder(config)
    batch, prompt_len = tokens.shape
    slots = prompt_len + max_new_tokens
    mask = attention_mask.astype(bool)
    key_mask = jnp.concatenate([mask, jnp.zeros((batch, max_new_tokens), bool)], axis=1)
    cache = init_cache(config, batch, slots)
    logits, cache = model.apply(
        {"params": params},
        tokens,
        cache,
        0,
        key_mask,
        default_positions(mask),
        neuron,
        last_only=True,
        method=Decoder.decode,
    )
    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)  # [B]
    stops = jnp.asarray(stop_ids, jnp.int32)

    def is_stop(token):
        return jnp.any(token[:, None] == stops[None, :], axis=-1) if stop_ids else token < 0

    out = jnp.full((batch, max_new_tokens), config.pad_token_id, jnp.int32).at[:, 0].set(first)
    next_pos = jnp.sum(mask, axis=1).astype(jnp.int32)  # [B] position of the first new token
    state = (1, first, is_stop(first), out, cache, key_mask, next_pos)

    def cond(state):
        step, _, done, *_ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, token, done, out, cache, key_mask, pos = state
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
        return step + 1, new, done | is_stop(new), out, cache, key_mask, pos + 1

    return jax.lax.while_loop(cond, body, state)[3]
