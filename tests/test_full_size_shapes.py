"""Full-size presets: shapes and parameter counts equal the HF models', with nothing allocated.

Our side is `jax.eval_shape` only; the HF side instantiates the PyTorch model on torch's "meta"
device (shapes without storage) from the same `config.json` dict, so an 8B model costs nothing.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from meg_jax.checkpoints.hf_decoder import abstract_decoder_params, lm_config_from_hf
from meg_jax.checkpoints.presets import PRESETS, hf_config, lm_config
from meg_jax.models.decoder import Decoder
from meg_jax.models.neuron import Neuron, neuron_vector_size

FULL_SIZE = ["gpt-j-6b", "phi-2", "llama-3-8b-instruct", "llama-3.1-8b-instruct"]


def _hf_config(name: str):
    fields = hf_config(name)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def _hf_meta_model(name: str):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(_hf_config(name))


def _is_layer_param(name: str) -> bool:
    return ".layers." in name or ".h." in name


@pytest.mark.parametrize("name", FULL_SIZE + ["smollm2-135m"])
def test_parameter_counts_match_hf(name):
    model = _hf_meta_model(name)
    # `parameters()` holds no buffers (rotary caches, masks) and lists a tied weight once.
    hf_total = sum(p.numel() for p in model.parameters())
    hf_layers = sum(p.numel() for n, p in model.named_parameters() if _is_layer_param(n))

    abstract = abstract_decoder_params(lm_config(name))
    leaves = jax.tree.leaves(abstract)
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)  # nothing allocated
    ours_total = sum(int(np.prod(leaf.shape)) for leaf in leaves)
    ours_layers = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(abstract["layers"]))
    assert ours_total == hf_total
    assert ours_layers == hf_layers


def _gpt_style_count(V, D, L, F, attn_bias: bool) -> int:
    """GPT-J / Phi-2: embed, untied head with bias, final LayerNorm, and per layer one LayerNorm,
    q k v o [D, D] (with biases on Phi-2), fc_in and fc_out with biases."""
    layer = 2 * D + 4 * D * D + (4 * D if attn_bias else 0) + 2 * D * F + F + D
    return V * D + (D * V + V) + 2 * D + L * layer


def _llama_style_count(V, D, L, F, K, tied: bool) -> int:
    """Llama: embed, head unless tied, final RMSNorm, and per layer two RMSNorms, q o [D, D],
    k v [D, K] (K = KV heads x head dim), gate up down."""
    layer = 2 * D + 2 * D * D + 2 * D * K + 3 * D * F
    return V * D + (0 if tied else D * V) + D + L * layer


# Closed-form counts, a check on the HF side of the comparison above (which trusts HF's config
# classes to read every field of the preset dict).
CLOSED_FORM = {
    "gpt-j-6b": _gpt_style_count(50400, 4096, 28, 16384, attn_bias=False),
    "phi-2": _gpt_style_count(51200, 2560, 32, 10240, attn_bias=True),
    "llama-3-8b-instruct": _llama_style_count(128256, 4096, 32, 14336, 8 * 128, tied=False),
    "smollm2-135m": _llama_style_count(49152, 576, 30, 1536, 3 * 64, tied=True),
}


@pytest.mark.parametrize("name", sorted(CLOSED_FORM))
def test_parameter_counts_closed_form(name):
    abstract = abstract_decoder_params(lm_config(name))
    assert sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(abstract)) == CLOSED_FORM[name]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_survives_hf_config_round_trip(name):
    """HF's config class normalises fields (v5 moves rope settings into `rope_parameters`);
    reading its `to_dict()` back must give the preset unchanged."""
    preset = PRESETS[name]
    again = lm_config_from_hf(
        _hf_config(name).to_dict(),
        Path(name),
        neuron_layer=preset.neuron_layer,
        neuron_activation=preset.neuron_activation,
    )
    assert again == lm_config(name)


def test_preset_fields():
    gptj, phi, llama = (lm_config(n) for n in ("gpt-j-6b", "phi-2", "llama-3-8b-instruct"))
    assert (gptj.d_ff, gptj.head_dim, gptj.rotary_dim, gptj.neuron_layer) == (16384, 256, 64, 9)
    assert gptj.neuron_activation == "model" and phi.neuron_activation == "model"
    assert (phi.rotary_dim, phi.head_dim, phi.neuron_layer) == (32, 80, 29)
    assert (llama.n_kv_heads, llama.rope_theta, llama.neuron_layer) == (8, 500000.0, 14)
    assert llama.neuron_activation == "identity" and llama.rope_scaling is None
    assert llama.eos_token_ids == (128001, 128009)
    scaled = lm_config("llama-3.1-8b-instruct").rope_scaling
    assert (scaled.factor, scaled.low_freq_factor, scaled.high_freq_factor) == (8.0, 1.0, 4.0)
    assert scaled.original_max_position == 8192
    assert lm_config("smollm2-135m").tie_embeddings
    assert lm_config("phi-2", dtype="float16").jnp_dtype == jnp.float16
    with pytest.raises(KeyError, match="unknown model preset"):
        lm_config("gpt-5")


@pytest.mark.parametrize("name", ["gpt-j-6b", "phi-2", "llama-3-8b-instruct"])
def test_full_size_patched_forward_shapes(name):
    """The patched forward at full size, traced abstractly: logits [B, T, V] in the config dtype."""
    cfg = lm_config(name, dtype="bfloat16")
    abstract = abstract_decoder_params(cfg)
    b, t, d = 2, 7, cfg.d_model
    neuron = Neuron(*(jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in ((b, d), (b,), (b, d))))
    tokens = jax.ShapeDtypeStruct((b, t), jnp.int32)
    mask = jax.ShapeDtypeStruct((b, t), jnp.bool_)
    out = jax.eval_shape(
        lambda p, x, m, n: Decoder(cfg).apply({"params": p}, x, m, None, n),
        abstract,
        tokens,
        mask,
        neuron,
    )
    assert out.shape == (b, t, cfg.vocab_size) and out.dtype == jnp.bfloat16
    assert (
        neuron_vector_size(d, cfg.neuron_has_bias)
        == {
            "gpt-j-6b": 8193,
            "phi-2": 5121,
            "llama-3-8b-instruct": 8192,
        }[name]
    )
