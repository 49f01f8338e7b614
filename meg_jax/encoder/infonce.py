"""InfoNCE over (paraphrase, original) pairs, retrieval top-1, and the pseudo-edit pairs.

Axes: B batch (pairs), N evaluated pairs, E embedding width.

Loss (METHOD.md §2.2): for paraphrase i, the positive is original i and the negatives are the
other originals in the batch; similarities are cosines divided by a temperature tau,
    L = -(1/B) sum_i log softmax_j(cos(p_i, o_j) / tau)[i].
The reference builds logits as [cos(p_i, o_i), p_i . o_j (j != i)] on L2-normalised vectors,
which is the same thing.

Retrieval top-1 is the stage's selection metric: the fraction of paraphrases whose most similar
original (cosine, among all N originals) is their own. The reference logs it with squared L2 on
the same vectors; after normalisation both rankings agree, and cosine is what InfoNCE trains.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from meg_jax.data.records import EditRecord
from meg_jax.encoder.text_encoder import l2_normalize
from meg_jax.infra.numeric import log_softmax_at

Pair = tuple[str, str]  # (original, paraphrase)


def info_nce_loss(paraphrase: jnp.ndarray, original: jnp.ndarray, temperature: float):
    """Mean InfoNCE loss of paraphrase[B, E] against original[B, E] with in-batch negatives."""
    p = l2_normalize(paraphrase.astype(jnp.float32))
    o = l2_normalize(original.astype(jnp.float32))
    logits = jnp.einsum("ie,je->ij", p, o) / temperature  # [B, B]
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - jnp.diagonal(logits))


def _unit_rows(x: np.ndarray, dtype) -> np.ndarray:
    """Rows of x[N, E] scaled to unit length, in `dtype` (an all-zero row stays zero)."""
    x = np.asarray(x, dtype)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def retrieval_top1(
    queries: np.ndarray, gallery: np.ndarray, targets: np.ndarray | None = None, chunk: int = 1024
) -> float:
    """Fraction of queries[N, E] whose cosine-nearest row of gallery[M, E] is `targets[i]`.

    `targets` defaults to 0..N-1 (query i belongs to gallery row i, which needs M == N).
    """
    q = np.asarray(queries, np.float32)
    g = np.asarray(gallery, np.float32)
    if targets is None:
        if len(q) != len(g):
            raise ValueError(f"{len(q)} queries and {len(g)} gallery rows: pass targets")
        targets = np.arange(len(q))
    targets = np.asarray(targets)
    if targets.shape != (len(q),) or q.shape[1:] != g.shape[1:]:
        raise ValueError(f"queries {q.shape}, gallery {g.shape}, targets {targets.shape} disagree")
    q, g = _unit_rows(q, np.float32), _unit_rows(g, np.float32)
    hits = 0
    for start in range(0, len(q), chunk):
        sims = q[start : start + chunk] @ g.T  # [chunk, M]
        hits += int(np.sum(np.argmax(sims, axis=-1) == targets[start : start + chunk]))
    return hits / max(len(q), 1)


def retrieval_loss(
    queries: np.ndarray, gallery: np.ndarray, targets: np.ndarray, temperature: float
) -> float:
    """Mean cross-entropy of each query[N, E]'s target row among all rows of gallery[M, E],
    over cosines / temperature: InfoNCE with the whole gallery as negatives.

    Unlike top-1 it keeps moving once every query already retrieves its target, by how far the
    target's cosine stands above the others'.
    """
    q, g = _unit_rows(queries, np.float64), _unit_rows(gallery, np.float64)
    return float(-np.mean(log_softmax_at(q @ g.T / temperature, targets)))  # logits [N, M]


def retrieval_sets(pairs: Sequence[Pair]) -> tuple[list[str], list[str], np.ndarray]:
    """(distinct originals, paraphrases, index of each paraphrase's original) for retrieval.

    Originals are deduplicated so that two paraphrases of one original do not compete with a
    copy of their own answer.
    """
    index: dict[str, int] = {}
    targets = [index.setdefault(o, len(index)) for o, _ in pairs]
    return list(index), [p for _, p in pairs], np.asarray(targets, np.int64)


def pseudo_edit_pairs(records: Sequence[EditRecord], paraphrases_per_record: int = 2) -> list[Pair]:
    """(prompt, paraphrase) pairs: the first `paraphrases_per_record` paraphrases of each record.

    The reference uses 2 per record (both CounterFact `paraphrase_prompts`, the first two GLM
    rephrases for zsRE). A record without any paraphrase is an error naming its file and index.
    """
    pairs = []
    for record in records:
        if not record.paraphrases:
            raise ValueError(f"{record.source.describe('paraphrases')}: no paraphrase to pair with")
        pairs += [(record.prompt, p) for p in record.paraphrases[:paraphrases_per_record]]
    return pairs


def split_pairs(pairs: Sequence[Pair], n_val: int, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(train, validation) with about `n_val` pairs held out, chosen by `seed`.

    Pairs sharing an original stay on the same side, and a held-out pair that shares any text
    with a training pair (CounterFact repeats some prompts across records) is dropped, so the
    validation texts are all unseen in training, as the held-out check needs.
    """
    per_original: dict[str, int] = {}
    for o, _ in pairs:
        per_original[o] = per_original.get(o, 0) + 1
    originals = list(per_original)
    val_originals, count = set(), 0
    for i in np.random.default_rng(seed).permutation(len(originals)):
        if count >= n_val:
            break
        val_originals.add(originals[i])
        count += per_original[originals[i]]
    train = [p for p in pairs if p[0] not in val_originals]
    seen = {text for pair in train for text in pair}
    val = [p for p in pairs if p[0] in val_originals and not seen.intersection(p)]
    if not train or not val:
        raise ValueError(f"cannot hold out {n_val} of {len(pairs)} pairs and still train")
    return train, val
