"""Architecture description of a BERT-family text encoder (bert-base-uncased, all-MiniLM-L6-v2).

The MeG query condition is the [CLS] vector of a BERT encoder; only the absolute-position,
post-LayerNorm, exact-GELU encoder is implemented, and `bert_config_from_hf` in
`meg_jax.checkpoints.bert_keys` refuses every `config.json` that asks for something else.
"""

import dataclasses

from meg_jax.models.config import DTYPES


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Static description of a BERT encoder; frozen and hashable (a static jit argument).

    `n_top_layers` splits the stack: the last `n_top_layers` layers live in their own parameter
    subtree (`top_layers`) so the InfoNCE stage can train only them and run the frozen rest once.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    max_position: int = 512
    type_vocab_size: int = 2
    norm_eps: float = 1e-12
    pad_token_id: int = 0
    n_top_layers: int = 0
    # Parameter and compute dtype; attention softmax and LayerNorm statistics run in float32.
    dtype: str = "float32"

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not a multiple of n_heads={self.n_heads}")
        # At least one layer stays in the frozen stack, which keeps both stacks non-empty scans.
        if not 0 <= self.n_top_layers < self.n_layers:
            raise ValueError(f"n_top_layers={self.n_top_layers} outside [0, {self.n_layers})")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} not in {sorted(DTYPES)}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def n_frozen_layers(self) -> int:
        return self.n_layers - self.n_top_layers

    @property
    def jnp_dtype(self):
        return DTYPES[self.dtype]

    def replace(self, **changes) -> "BertConfig":
        return dataclasses.replace(self, **changes)
