"""BERT tokenisation into fixed, bucketed shapes, so jitted encoders compile a handful of times.

Axes: B batch, T tokens (a bucket length).

Texts are tokenised without padding by the directory's own tokenizer (`tokenizer.json` through
transformers' `AutoTokenizer`, offline), then right-padded to the smallest bucket that holds the
longest text of the batch. Every distinct (B, T) is one compilation of the jitted encoder; with
the default buckets a whole data set compiles at most six shapes per batch size.
"""

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

BUCKETS = (16, 32, 64, 128, 256, 512)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TokenBatch:
    """Right-padded BERT inputs, each int32 [B, T]; `mask` is 1 on real tokens."""

    ids: np.ndarray
    mask: np.ndarray
    types: np.ndarray

    def __len__(self) -> int:
        return self.ids.shape[0]

    def take(self, index) -> "TokenBatch":
        """The rows `index` (an int array or slice), as a new batch."""
        return TokenBatch(self.ids[index], self.mask[index], self.types[index])


def bucket_length(n_tokens: int, max_length: int, buckets: Sequence[int] = BUCKETS) -> int:
    """The smallest bucket >= n_tokens, capped at `max_length`."""
    for b in buckets:
        if b >= n_tokens:
            return min(b, max_length)
    return max_length


class BertTokenizer:
    """Tokenises text lists into `TokenBatch`es of bucketed length.

    Args:
      path: a Hugging Face model directory with `tokenizer.json` (or `vocab.txt`).
      max_length: longer texts are truncated to this many tokens (BERT's positions end at 512);
        truncation is logged, since it changes what the encoder sees.
    """

    def __init__(self, path: str | Path, max_length: int = 512):
        from transformers import AutoTokenizer

        self.path = Path(path)
        try:
            self._tok = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        except (OSError, ValueError) as err:
            raise ValueError(f"{self.path}: cannot load a tokenizer ({err})") from err
        self.max_length = max_length
        self.pad_id = int(self._tok.pad_token_id or 0)

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Unpadded ids ([CLS] ... [SEP]) of every text, truncated to `max_length`."""
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text {i}: expected a str, got {type(text).__name__}")
        ids = self._tok(texts, add_special_tokens=True, truncation=False)["input_ids"]
        too_long = [i for i, row in enumerate(ids) if len(row) > self.max_length]
        if too_long:
            log.warning(
                "%d text(s) longer than %d tokens truncated (first: index %d)",
                len(too_long),
                self.max_length,
                too_long[0],
            )
            # Keep the closing [SEP]: BERT was trained with it, and [CLS] attends to it.
            cut = self.max_length - 1
            ids = [row if len(row) <= self.max_length else row[:cut] + row[-1:] for row in ids]
        return ids

    def bucket(self, n_tokens: int) -> int:
        """The padded length of a text of `n_tokens` tokens."""
        return bucket_length(n_tokens, self.max_length)

    def pad(self, ids: Sequence[Sequence[int]], length: int | None = None) -> TokenBatch:
        """Right-pads id lists to `length` (default: the bucket of the longest)."""
        longest = max((len(row) for row in ids), default=1)
        if length is None:
            length = self.bucket(longest)
        if longest > length:
            raise ValueError(f"a text has {longest} tokens, more than the padded length {length}")
        out = np.full((len(ids), length), self.pad_id, np.int32)
        mask = np.zeros((len(ids), length), np.int32)
        for i, row in enumerate(ids):
            out[i, : len(row)] = row
            mask[i, : len(row)] = 1
        return TokenBatch(out, mask, np.zeros_like(out))

    def __call__(self, texts: Sequence[str], length: int | None = None) -> TokenBatch:
        """Tokenises and pads `texts` (see `pad`)."""
        return self.pad(self.token_ids(texts), length)
