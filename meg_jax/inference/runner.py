"""Runs the host LLM for the evaluator: batched, sharded, jitted, one neuron per row.

Axes: Q queries, B rows per batch, T tokens, D model width, V vocabulary.

Everything the metrics need from the model reduces to two device computations, so only small
integer/float arrays ever come back to the host (never [B, T, V] logits):
  * greedy continuations (AG), via `meg_jax.models.generate.greedy_generate`;
  * per position: the argmax token and the log-probability of the next given token (TF, and the
    classic NLL metrics), or only the argmax after each sequence's last token (reference TF).
Queries are processed longest first in fixed-size batches (rows with the all-zero neuron batched
apart from the others), so a run compiles one program per length bucket, and results are
scattered back to the caller's order: the output never depends on batch composition order. A
short last batch is padded with dummy rows only up to the next of batch_size / 2^k.

Generation (see `greedy_generate`) compacts its batches as rows finish (down to
`min_decode_rows`), and the tokens that open every prompt of a call (a template's fixed text) run
once per batch: below the neuron layer, or through every layer in a batch of zero neurons (run
with no neuron at all, which is the same model).

Batches are split over the mesh's "data" axis; the parameters keep whatever sharding they were
loaded with (e.g. over "model").
"""

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from meg_jax.infra.distributed import gather_to_host
from meg_jax.infra.sharding import make_mesh, shard_batch
from meg_jax.models.config import LMConfig
from meg_jax.models.decoder import Decoder
from meg_jax.models.generate import greedy_generate, left_pad, pad_right
from meg_jax.models.neuron import Neuron


@functools.partial(jax.jit, static_argnames=("config",))
def _scores(config: LMConfig, params, ids, mask, labels, neuron):
    """(argmax [B, T], log p(labels[:, t]) at t [B, T]) of a right-padded batch."""
    logits = Decoder(config).apply({"params": params}, ids, mask, None, neuron)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, T, V]
    label_logp = jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), label_logp


@functools.partial(jax.jit, static_argnames=("config",))
def _last_argmax(config: LMConfig, params, ids, mask, neuron):
    """The argmax token [B] after each row's last real token of a right-padded batch."""
    logits = Decoder(config).apply(
        {"params": params}, ids, mask, neuron, method=Decoder.last_logits
    )
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def tokens_containing(tokenizer, texts: Sequence[str]) -> tuple[int, ...]:
    """Ids of the vocabulary tokens whose decoded text contains any of the one-character
    `texts` (e.g. every token with a newline in it)."""
    if any(len(t) != 1 for t in texts):
        raise ValueError(f"stop texts must be single characters, got {list(texts)}")
    if not texts:
        return ()
    return tuple(i for i in range(len(tokenizer)) if any(t in tokenizer.decode([i]) for t in texts))


def take_rows(neurons: Neuron, rows: np.ndarray) -> Neuron:
    """The neurons of `rows` (host numpy arrays)."""
    return Neuron(*(np.asarray(x)[rows] for x in neurons))


class ModelRunner:
    """A host model ready for evaluation: config, parameters, tokenizer and a mesh."""

    def __init__(
        self,
        config: LMConfig,
        params,
        tokenizer,
        *,
        mesh: Mesh | None = None,
        batch_size: int = 32,
        bucket: int = 8,
        min_decode_rows: int | None = None,
        show_progress: bool = True,
    ):
        self.config, self.params, self.tokenizer = config, params, tokenizer
        self.mesh = mesh if mesh is not None else make_mesh()
        data = self.mesh.shape["data"]
        if min_decode_rows is None:  # about 8 rows: the fewest worth a compiled program
            min_decode_rows = data * max(1, 8 // data)
        for name, value in (("batch_size", batch_size), ("min_decode_rows", min_decode_rows)):
            if value % data:
                raise ValueError(f"{name} {value} is not a multiple of the data axis {data}")
        self.batch_size, self.bucket, self.show_progress = batch_size, bucket, show_progress
        self.min_decode_rows = min_decode_rows
        self._stop_cache: dict[tuple[str, ...], tuple[int, ...]] = {}

    def _batches(self, lengths: Sequence[int], zero: np.ndarray, desc: str):
        """Index arrays of fixed-size batches: rows with a nonzero neuron, then the `zero` ones,
        each longest first."""
        order = np.lexsort((-np.asarray(lengths), zero))
        starts = range(0, len(order), self.batch_size)
        for start in tqdm(starts, desc=desc, disable=not self.show_progress, leave=False):
            yield order[start : start + self.batch_size]

    def _rows_for(self, n: int) -> int:
        """The batch a group of n rows runs as: the smallest batch_size / 2^k that holds them
        and splits over the data axis (so a short last batch costs few dummy rows and at most
        log2(batch_size) more compiled shapes)."""
        size = self.batch_size
        while size % 2 == 0 and size // 2 >= n and (size // 2) % self.mesh.shape["data"] == 0:
            size //= 2
        return size

    def _run_batches(self, items, lengths, neurons, desc, run_batch: Callable) -> list:
        out: list = [None] * len(items)
        zero = ~np.any(
            np.concatenate([np.asarray(x).reshape(len(items), -1) for x in neurons], 1), 1
        )
        for rows in self._batches(lengths, zero, desc):
            # Dummy rows repeat the last real one; their results are dropped.
            rows_padded = np.concatenate(
                [rows, np.repeat(rows[-1:], self._rows_for(len(rows)) - len(rows))]
            )
            batch = [items[r] for r in rows_padded]
            for r, value in zip(
                rows, run_batch(batch, take_rows(neurons, rows_padded)), strict=False
            ):
                out[r] = value
        return out

    def generate(
        self,
        prompts: Sequence[str],
        neurons: Neuron,
        max_new_tokens: int,
        stop_texts: Sequence[str] = (),
    ) -> list[str]:
        """Greedy continuations (special tokens skipped) of `prompts`, each with its neuron."""
        new = self.generate_ids(prompts, neurons, max_new_tokens, stop_texts)
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)

    def generate_ids(
        self,
        prompts: Sequence[str],
        neurons: Neuron,
        max_new_tokens: int,
        stop_texts: Sequence[str] = (),
    ) -> list[list[int]]:
        """The greedy new token ids of `prompts`, each with its neuron, up to and including the
        first stop token (or `max_new_tokens` of them).

        Stop tokens are the model's EOS ids and, when given, every token whose text contains one
        of the one-character `stop_texts`: a caller that cuts answers at a newline loses nothing
        by ending a row at its first newline, and a batch ends as soon as all its rows have.
        """
        sequences = [self.tokenizer(p)["input_ids"] for p in prompts]
        stop_ids = tuple(self.config.eos_token_ids) + self._stop_tokens(tuple(stop_texts))
        stops = set(stop_ids)
        # Prompts built from one template open with the same tokens: those run once per batch
        # below the neuron layer (`greedy_generate`'s prefix), every row keeps one of its own.
        shared = shared_prefix(sequences)
        rests = [s[len(shared) :] for s in sequences]

        def run(batch, neuron):
            tokens, mask = left_pad(batch, self.config.pad_token_id, bucket=self.bucket)
            if not any(np.any(x) for x in neuron):
                neuron = None  # all zero: the unpatched model, which shares more of the prefix
            tokens, mask, neuron = shard_batch(self.mesh, (tokens, mask, neuron))
            new = greedy_generate(
                self.config,
                self.params,
                tokens,
                mask,
                neuron,
                max_new_tokens=max_new_tokens,
                stop_ids=stop_ids,
                min_rows=self.min_decode_rows,
                prefix=shared,
            )
            return [_until_stop(row, stops) for row in gather_to_host(new).tolist()]

        lengths = [len(s) for s in rests]
        return self._run_batches(rests, lengths, neurons, "generate", run)

    def _stop_tokens(self, stop_texts: tuple[str, ...]) -> tuple[int, ...]:
        # Decoding the whole vocabulary takes a moment: once per runner and stop set.
        if stop_texts not in self._stop_cache:
            self._stop_cache[stop_texts] = tokens_containing(self.tokenizer, stop_texts)
        return self._stop_cache[stop_texts]

    def last_argmax(self, sequences: Sequence[Sequence[int]], neurons: Neuron) -> list[int]:
        """Per sequence, the greedy next token after its last token, under its neuron."""

        def run(batch, neuron):
            ids, mask = pad_right(batch, self.config.pad_token_id, self.bucket)
            ids, mask, neuron = shard_batch(self.mesh, (ids, mask, neuron))
            argmax = _last_argmax(self.config, self.params, ids, mask, neuron)
            return gather_to_host(argmax).tolist()

        return self._run_batches(list(sequences), [len(s) for s in sequences], neurons, "tf", run)

    def scores(
        self,
        sequences: Sequence[Sequence[int]],
        neurons: Neuron,
        labels: Sequence[Sequence[int]] | None = None,
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per sequence: (argmax [T], log p(label[t]) at each position t [T]) under its neuron.

        `labels[i]` has one token per position of `sequences[i]` (e.g. the sequence shifted by
        one plus the final target token); by default only the argmax is meaningful.
        """
        if labels is None:
            labels = sequences
        pairs = list(zip(sequences, labels, strict=True))

        def run(batch, neuron):
            ids, mask = pad_right([s for s, _ in batch], self.config.pad_token_id, self.bucket)
            lab, _ = pad_right([lab for _, lab in batch], self.config.pad_token_id, self.bucket)
            ids, mask, lab, neuron = shard_batch(self.mesh, (ids, mask, lab, neuron))
            argmax, logp = gather_to_host(_scores(self.config, self.params, ids, mask, lab, neuron))
            return [(argmax[i, : len(s)], logp[i, : len(s)]) for i, (s, _) in enumerate(batch)]

        lengths = [len(s) for s in sequences]
        return self._run_batches(pairs, lengths, neurons, "score", run)


def shared_prefix(sequences: Sequence[Sequence[int]]) -> list[int]:
    """The longest run of tokens that opens every sequence, leaving each at least one more."""
    if not sequences:
        return []
    limit = min(len(s) for s in sequences) - 1
    first = sequences[0]
    n = 0
    while n < limit and all(s[n] == first[n] for s in sequences):
        n += 1
    return list(first[:n])


def _until_stop(row: list[int], stops: set[int]) -> list[int]:
    """A generated row up to and including its first stop token (the rest is padding)."""
    for i, token in enumerate(row):
        if token in stops:
            return row[: i + 1]
    return row
