"""The query encoder f_TE: text -> BERT [CLS] vector, batched, bucketed and jitted.

Axes: B batch, T tokens, D encoder width (= E, the condition/embedding size).

One `TextEncoder` serves both uses of the encoder in MeG (METHOD.md §4.5), differing only in
two fields, so the same weights are never loaded twice:
  - the router input: the raw query, not normalised (`template="{query}"`, `normalize=False`);
  - the generator condition: the query in the LLM prompt template, L2-normalised.
`with_view` gives the other view of the same encoder.

`encode` sorts texts by length, so each batch pads to the smallest bucket its texts need, and
rounds the batch up to a power of two (at least the data-axis size): a data set compiles a few
(B, T) shapes, however many texts it has. Batches are split over the mesh's "data" axis; the
encoder weights are replicated (BERT is small next to the host LLM).
"""

import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization
from jax.sharding import Mesh

from meg_jax.checkpoints.bert_keys import load_hf_bert
from meg_jax.data.templates import PLACEHOLDER, fill_template
from meg_jax.encoder.tokenize import BertTokenizer, TokenBatch
from meg_jax.infra.distributed import device_put_global, gather_to_host
from meg_jax.infra.files import write_bytes_atomic
from meg_jax.infra.sharding import make_mesh, replicated, shard_batch
from meg_jax.models.bert import Bert
from meg_jax.models.bert_config import BertConfig


def apply_template(template: str, texts: Sequence[str]) -> list[str]:
    """Wraps each text in `template` (a string with one `{query}`, as `PromptTemplate.query`)."""
    return [fill_template(template, text) for text in texts]


def l2_normalize(x: jnp.ndarray, eps: float = 1e-12) -> jnp.ndarray:
    """x / ||x|| along the last axis (torch's F.normalize: the norm is clamped at `eps`)."""
    norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
    return x / jnp.maximum(norm, eps)


@functools.partial(jax.jit, static_argnames=("config", "normalize"))
def cls_vectors(config: BertConfig, params, ids, mask, types, normalize: bool = False):
    """[CLS] of `last_hidden_state` [B, D] in float32 for token arrays [B, T]."""
    out = Bert(config).apply({"params": params}, ids, mask, types, method=Bert.cls)
    out = out.astype(jnp.float32)
    return l2_normalize(out) if normalize else out


@functools.partial(jax.jit, static_argnames=("config",))
def frozen_hidden(config: BertConfig, params, ids, mask, types):
    """Hidden states [B, T, D] after the frozen layers: the fixed input of the tuned layers."""
    return Bert(config).apply({"params": params}, ids, mask, types, method=Bert.frozen_hidden)


def batch_rows(n: int, batch_size: int, multiple: int) -> int:
    """Rows that a batch of n >= 1 texts is padded to, rounded up to a multiple of `multiple`.

    Up to `batch_size`, the next power of two (capped at `batch_size`), so the last, short batch
    of a data set reuses one of a few compiled shapes; a larger batch keeps its size.
    """
    rows = min(1 << (n - 1).bit_length(), batch_size) if n <= batch_size else n
    return -(-rows // multiple) * multiple


@dataclasses.dataclass(frozen=True, eq=False)
class TextEncoder:
    """A BERT encoder with its tokenizer and the view (template, normalisation) it encodes in."""

    config: BertConfig
    params: dict
    tokenizer: BertTokenizer
    mesh: Mesh
    template: str = PLACEHOLDER
    normalize: bool = False
    batch_size: int = 128
    # True: every text is padded to its own length bucket and every batch to `batch_size` rows,
    # so a text's vector is computed by the same program whatever other texts it comes with
    # (the editor's views: a query's neuron must not depend on its batch).
    fixed_shapes: bool = False

    def __post_init__(self):
        if self.batch_size % self.mesh.shape["data"]:
            raise ValueError(
                f"batch_size={self.batch_size} is not a multiple of the mesh's data axis "
                f"({self.mesh.shape['data']} devices)"
            )

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        n_top_layers: int = 1,
        dtype: str = "float32",
        max_length: int = 512,
        mesh: Mesh | None = None,
        **view,
    ) -> "TextEncoder":
        """Loads a HF BERT directory; `view` sets template, normalize, batch_size."""
        config, params = load_hf_bert(path, n_top_layers=n_top_layers, dtype=dtype)
        mesh = make_mesh() if mesh is None else mesh
        params = device_put_global(params, replicated(mesh))
        tokenizer = BertTokenizer(path, max_length=min(max_length, config.max_position))
        return cls(config, params, tokenizer, mesh, **view)

    def with_view(self, **view) -> "TextEncoder":
        """The same weights with another template / normalize / batch_size."""
        return dataclasses.replace(self, **view)

    def with_top_layers(self, top_layers) -> "TextEncoder":
        """The same encoder with tuned `top_layers` (from the InfoNCE stage)."""
        params = dict(self.params, top_layers=device_put_global(top_layers, replicated(self.mesh)))
        return dataclasses.replace(self, params=params)

    def tokenize(self, texts: Sequence[str], length: int | None = None) -> TokenBatch:
        """Texts in this view's template, tokenised and padded (to `length` or a bucket)."""
        return self.tokenizer(apply_template(self.template, texts), length)

    def encode_batch(self, batch: TokenBatch) -> np.ndarray:
        """[CLS] vectors [B, D] of an already tokenised batch (padded to a multiple of the mesh)."""
        n = len(batch)
        data = self.mesh.shape["data"]
        rows = -(-self.batch_size // data) * data if self.fixed_shapes else None
        rows = rows or batch_rows(n, self.batch_size, data)
        pad = rows - n
        # Padding rows repeat row 0: real tokens, so they never produce an all-masked softmax.
        padded = batch.take(np.concatenate([np.arange(n), np.zeros(pad, np.int64)]))
        ids, mask, types = shard_batch(self.mesh, (padded.ids, padded.mask, padded.types))
        out = cls_vectors(self.config, self.params, ids, mask, types, self.normalize)
        return gather_to_host(out)[:n]

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """[CLS] vectors [N, D] (float32) of `texts` in this view."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.config.d_model), np.float32)
        ids = self.tokenizer.token_ids(apply_template(self.template, texts))
        order = np.argsort([len(row) for row in ids], kind="stable")
        out = np.empty((len(texts), self.config.d_model), np.float32)
        groups = [order]
        if self.fixed_shapes:  # one group per length bucket: a text's padding is its own
            buckets = np.asarray([self.tokenizer.bucket(len(ids[i])) for i in order])
            groups = [order[buckets == b] for b in np.unique(buckets)]
        for group in groups:
            for start in range(0, len(group), self.batch_size):
                chosen = group[start : start + self.batch_size]
                batch = self.tokenizer.pad([ids[i] for i in chosen])
                out[chosen] = self.encode_batch(batch)
        return out


def save_top_layers(encoder: TextEncoder, path: str | Path) -> None:
    """Writes the encoder's trainable `top_layers` (the InfoNCE stage's artefact) atomically."""
    tree = jax.device_get(encoder.params["top_layers"])
    write_bytes_atomic(path, serialization.msgpack_serialize(tree))


def load_top_layers(path: str | Path):
    """The `top_layers` written by `save_top_layers` (for `TextEncoder.with_top_layers`)."""
    try:
        return serialization.msgpack_restore(Path(path).read_bytes())
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{path}: no readable encoder layers ({type(err).__name__}: {err}); rerun the "
            "encoder stage (--config.stage=encoder)"
        ) from None
