"""Teacher-forced (TF) token accuracy, as the MeG/MEMIT reference computes it, and a fast variant.

Axes: B batch, T tokens, V vocabulary, M target tokens.

Reference TF (`build_tf_queries`, `tf_token_correct`), for a prompt and a target:
  1. t_1..t_m = tokenize(" " + target) WITHOUT special tokens;
  2. for each i, the STRING prompt + decode(t_<i) is re-tokenised as the model expects (a
     Llama tokenizer adds BOS here) and run through the model;
  3. the argmax at the last real position is compared with the first token of
     tokenize(decode(t_i)) without special tokens.
  Per-example accuracy is the mean over its m tokens; the metric (`tf_accuracy`) is the mean over
  examples, as a percentage. Batches are right-padded and read at the last unmasked position.
  The reference tokenises targets with special tokens, which for Llama-3 puts BOS first and
  compares every step with BOS; METHOD.md §1.3 says to fix that, and we do.
  If decode(t_i) re-tokenises to nothing, the step counts as wrong (expected id -1); the
  reference would compare with the pad id.

Fast TF (`build_target_query`, `fast_tf_token_correct`): one forward pass over
prompt ids + t_1..t_{m-1}, comparing the argmax at each target position with t_i. It differs from
the reference in two ways:
  - no re-tokenisation of the joined string: where BPE would merge across the prompt/target
    boundary (a prompt ending in a space, say), the reference sees different tokens;
  - the expected token is t_i itself, not the first token of tokenize(decode(t_i)); they differ
    for tokens that are not whole characters (a CJK character split over byte tokens decodes to
    U+FFFD, which re-tokenises to another id), where the reference counts near-certain misses.
  For ordinary English targets with GPT-2/Llama tokenizers both give the same flags.
The same target query gives per-token log-probabilities (`target_logprobs`), which the
CounterFact NLL metrics in `meg_jax.evaluation.classic` need.
"""

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
from transformers import PreTrainedTokenizerBase

from meg_jax.evaluation.metrics import LogitsFn
from meg_jax.infra.numeric import log_softmax_at
from meg_jax.models.generate import pad_right

_NO_TOKEN = -1


@dataclasses.dataclass(frozen=True)
class TFQuery:
    """One reference TF step: the re-tokenised prefix and the token expected after it."""

    input_ids: tuple[int, ...]
    expected_id: int  # -1 when decode(t_i) re-tokenises to nothing: never matched


@dataclasses.dataclass(frozen=True)
class TargetQuery:
    """One forward pass scoring a whole target: prompt ids + target ids[:-1].

    The logits at position `target_start - 1 + j` predict `target_ids[j]`.
    """

    input_ids: tuple[int, ...]
    target_start: int
    target_ids: tuple[int, ...]


def target_token_ids(tokenizer: PreTrainedTokenizerBase, target: str) -> list[int]:
    """t_1..t_m: `" " + target` tokenised without special tokens (no BOS, ever)."""
    ids = list(tokenizer(" " + target, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ValueError(f"target {target!r} tokenises to no tokens")
    return ids


def build_tf_queries(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    target: str,
    add_special_tokens: bool = True,
) -> list[TFQuery]:
    """The m reference TF steps of (prompt, target); `add_special_tokens` applies to prompts."""
    target_ids = target_token_ids(tokenizer, target)
    queries = []
    for i, token in enumerate(target_ids):
        text = prompt + tokenizer.decode(target_ids[:i])
        ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        retokenised = tokenizer(tokenizer.decode([token]), add_special_tokens=False)["input_ids"]
        queries.append(TFQuery(tuple(ids), retokenised[0] if retokenised else _NO_TOKEN))
    return queries


def build_target_query(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    target: str,
    add_special_tokens: bool = True,
) -> TargetQuery:
    """The single-forward query of (prompt, target) for fast TF and target log-probs."""
    prompt_ids = list(tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])
    if not prompt_ids:
        raise ValueError(f"prompt {prompt!r} tokenises to no tokens; nothing predicts the target")
    target_ids = target_token_ids(tokenizer, target)
    return TargetQuery(tuple(prompt_ids + target_ids[:-1]), len(prompt_ids), tuple(target_ids))


def _batched_logits(
    sequences: Sequence[Sequence[int]],
    logits_fn: LogitsFn,
    pad_id: int,
    batch_size: int,
    multiple_of: int,
    read: Callable[[np.ndarray, int], object],
) -> list:
    """`read(logits[T, V], index)` for every sequence, run `batch_size` at a time."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        ids, mask = pad_right(chunk, pad_id, multiple_of)
        logits = np.asarray(logits_fn(ids, mask))
        if logits.shape[:2] != ids.shape:
            raise ValueError(f"logits_fn returned shape {logits.shape} for ids {ids.shape}")
        out.extend(read(logits[row], start + row) for row in range(len(chunk)))
    return out


def tf_token_correct(
    queries: Sequence[Sequence[TFQuery]],
    logits_fn: LogitsFn,
    pad_id: int,
    batch_size: int = 64,
    multiple_of: int = 1,
) -> list[np.ndarray]:
    """Reference TF: per example (one list of `TFQuery` each) a bool array [m] of correct steps.

    The reference pads with EOS; any `pad_id` gives the same flags, as padding is never read.
    """
    flat = [q for example in queries for q in example]
    sequences = [q.input_ids for q in flat]

    def read(row_logits: np.ndarray, index: int) -> bool:
        last = len(flat[index].input_ids) - 1
        return int(np.argmax(row_logits[last])) == flat[index].expected_id

    flags = np.asarray(
        _batched_logits(sequences, logits_fn, pad_id, batch_size, multiple_of, read), dtype=bool
    )
    bounds = np.cumsum([0] + [len(example) for example in queries])
    return [flags[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _target_rows(row_logits: np.ndarray, query: TargetQuery) -> np.ndarray:
    """logits [M, V] at the positions that predict the target tokens."""
    first = query.target_start - 1
    return row_logits[first : first + len(query.target_ids)]


def fast_tf_token_correct(
    queries: Sequence[TargetQuery],
    logits_fn: LogitsFn,
    pad_id: int,
    batch_size: int = 64,
    multiple_of: int = 1,
) -> list[np.ndarray]:
    """Fast TF: per query a bool array [m], argmax at each target position == the target token."""

    def read(row_logits: np.ndarray, index: int) -> np.ndarray:
        query = queries[index]
        return np.argmax(_target_rows(row_logits, query), axis=-1) == np.asarray(query.target_ids)

    return _batched_logits(
        [q.input_ids for q in queries], logits_fn, pad_id, batch_size, multiple_of, read
    )


def target_logprobs(
    queries: Sequence[TargetQuery],
    logits_fn: LogitsFn,
    pad_id: int,
    batch_size: int = 64,
    multiple_of: int = 1,
) -> list[np.ndarray]:
    """Per query float64 [m]: log p(t_j | prompt, t_<j) of each target token."""

    def read(row_logits: np.ndarray, index: int) -> np.ndarray:
        query = queries[index]
        return log_softmax_at(_target_rows(row_logits, query), list(query.target_ids))

    return _batched_logits(
        [q.input_ids for q in queries], logits_fn, pad_id, batch_size, multiple_of, read
    )


def tf_accuracy(per_example: Sequence[Sequence[bool]]) -> float:
    """TF metric: mean over tokens within each example, then over examples, as a percentage."""
    if len(per_example) == 0:
        raise ValueError("no examples to average")
    if any(len(flags) == 0 for flags in per_example):
        raise ValueError("an example has no target tokens")
    return 100.0 * float(np.mean([np.mean(np.asarray(f, dtype=np.float64)) for f in per_example]))
