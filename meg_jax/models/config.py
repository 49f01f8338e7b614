"""Architecture description of a decoder-only host LLM, shared by GPT-J, Phi-2 and the Llama family.

The three families differ only in a handful of switches (norm kind, parallel vs sequential
residual, MLP kind, which projections carry biases, rotary layout), so one `LMConfig` and one
decoder implementation cover them; the checkpoint readers fill the config from `config.json` or
GGUF metadata and refuse fields whose value we do not implement.
"""

import dataclasses
import math
import numbers
from typing import Literal

import jax.numpy as jnp

Arch = Literal["llama", "gptj", "phi"]

NEURON_ACTIVATIONS = ("model", "identity")
_POSITIVE_INTS = (
    "vocab_size",
    "d_model",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "head_dim",
    "d_ff",
    "max_position",
)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling (`rope_scaling.rope_type == "llama3"`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position: int


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """Static description of a host LLM plus where the dynamic neuron sits.

    Frozen and hashable: it is a static argument of every jitted function.
    """

    arch: Arch
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    norm_eps: float
    rotary_dim: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position: int = 2048
    tie_embeddings: bool = False
    # The layer (0-indexed, as in HF) whose MLP carries the dynamic neuron.
    neuron_layer: int = 0
    # "model": the MLP's own activation (GPT-J, Phi-2 in the reference); "identity": a linear
    # unit (the reference's Llama `extra_proj`).
    neuron_activation: Literal["model", "identity"] = "model"
    # Parameter and compute dtype; softmax, norms and rotary always run in float32.
    dtype: str = "float32"
    # Token ids used by generation and padding.
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0

    def __post_init__(self):
        if self.arch not in ("llama", "gptj", "phi"):
            raise ValueError(f"unsupported architecture {self.arch!r}; expected llama, gptj or phi")
        for name in _POSITIVE_INTS:
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LMConfig.{name}: expected a positive integer, got {value!r}")
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"LMConfig.{name}: expected a positive number, got {value!r}")
        if self.neuron_activation not in NEURON_ACTIVATIONS:
            # Checked here because the decoder treats anything but "model" as the identity.
            raise ValueError(
                f"LMConfig.neuron_activation: expected one of {NEURON_ACTIVATIONS}, "
                f"got {self.neuron_activation!r}"
            )
        if not isinstance(self.neuron_layer, numbers.Integral) or isinstance(
            self.neuron_layer, bool
        ):
            raise ValueError(
                f"LMConfig.neuron_layer: expected an integer, got {self.neuron_layer!r}"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads")
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise ValueError(f"rotary_dim={self.rotary_dim} must be even and <= head_dim")
        if not 0 <= self.neuron_layer < self.n_layers:
            raise ValueError(f"neuron_layer={self.neuron_layer} outside [0, {self.n_layers})")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} not in {sorted(DTYPES)}")

    # Derived switches: one place that says how the families differ.
    @property
    def norm_kind(self) -> str:
        return "rms" if self.arch == "llama" else "layer"

    @property
    def parallel_residual(self) -> bool:
        """GPT-J and Phi-2 add attention and MLP outputs of the same normed input."""
        return self.arch != "llama"

    @property
    def gated_mlp(self) -> bool:
        return self.arch == "llama"

    @property
    def qkv_bias(self) -> bool:
        return self.arch == "phi"

    @property
    def out_proj_bias(self) -> bool:
        return self.arch == "phi"

    @property
    def mlp_bias(self) -> bool:
        return self.arch != "llama"

    @property
    def lm_head_bias(self) -> bool:
        return self.arch != "llama"

    @property
    def rope_interleaved(self) -> bool:
        """GPT-J rotates (even, odd) pairs; the others rotate the two halves (NeoX style)."""
        return self.arch == "gptj"

    @property
    def neuron_has_bias(self) -> bool:
        """The reference's flat neuron has an input bias for GPT-J/Phi-2, none for Llama."""
        return self.arch != "llama"

    @property
    def jnp_dtype(self):
        return DTYPES[self.dtype]

    def replace(self, **changes) -> "LMConfig":
        return dataclasses.replace(self, **changes)
