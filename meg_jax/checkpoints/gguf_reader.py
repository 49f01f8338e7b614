"""llama.cpp GGUF files (Llama architecture) -> `LMConfig` + parameters, dequantized to float32.

Axes: V vocabulary, D model width, F MLP width, H heads, K head dim, L layers.

A GGUF file carries its architecture as metadata (`general.architecture`, `llama.*` fields) and
its tensors under llama.cpp names (`token_embd`, `blk.{i}.attn_q`, ...), each possibly quantized
(Q4_1, Q8_0, ...). We read it with the `gguf` package and reuse the Hugging Face Llama key map
(`decoder_rules`) with every source renamed to its GGUF name, so the strict checks of
`load_params` (missing, unexpected and misshapen tensors) apply and their errors name the GGUF
tensors. Tensors are dequantized lazily, one at a time, while parameters are filled.

Two differences from a HF checkpoint are undone here:
  - shapes: GGUF lists dimensions fastest-first, so a torch Linear weight [out, in] is stored as
    (in, out); the `gguf` reader's arrays are already row-major [out, in] (the reversed list);
  - Q/K rows: llama.cpp's converter permutes the rows of q_proj/k_proj within each head (HF's
    rotary rotates the two halves of a head, llama.cpp's rotates adjacent pairs); `unpermute_qk`
    is the inverse of that permutation (`permute_qk`).
"""

import dataclasses
import functools
from pathlib import Path
from typing import Any

import numpy as np

from meg_jax.checkpoints.convert import Rule, load_params
from meg_jax.checkpoints.errors import CheckpointError
from meg_jax.checkpoints.files import TensorStore
from meg_jax.checkpoints.hf_decoder import (
    abstract_decoder_params,
    decoder_rules,
    make_lm_config,
)
from meg_jax.models.config import LMConfig

# HF Llama tensor names (as `decoder_rules` spells them, `{i}` for the layer) -> GGUF names.
_GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


# ---- the llama.cpp Q/K row permutation ------------------------------------------------------


def permute_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """HF [H*K, D] -> llama.cpp's row order (what `convert_hf_to_gguf.py` writes).

    Within each head, rows (j, K/2 + j) of HF's half-split rotary become adjacent (2j, 2j+1).
    For k_proj, `n_heads` is the number of KV heads.
    """
    rows, rest = weight.shape[0], weight.shape[1:]
    half = rows // n_heads // 2
    return weight.reshape(n_heads, 2, half, *rest).swapaxes(1, 2).reshape(weight.shape)


def unpermute_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of `permute_qk`: llama.cpp's q/k rows [H*K, D] back to HF's order."""
    rows, rest = weight.shape[0], weight.shape[1:]
    half = rows // n_heads // 2
    return weight.reshape(n_heads, half, 2, *rest).swapaxes(1, 2).reshape(weight.shape)


# ---- metadata -------------------------------------------------------------------------------


def open_gguf(path) -> tuple[dict[str, Any], TensorStore]:
    """(metadata as plain Python values, lazily dequantized float32 tensors) of a GGUF file.

    Tensor arrays have numpy (row-major) shapes, i.e. GGUF's dimension list reversed.
    """
    import gguf  # the package; this module is named gguf_reader so as not to shadow it

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as err:
        # A truncated or damaged file surfaces as IndexError, ValueError, struct errors...
        # from deep inside the parser; name the file and the way out instead.
        raise CheckpointError(
            f"{path}: not a readable GGUF file ({path.stat().st_size} bytes; "
            f"{type(err).__name__}: {err}). It is truncated or damaged: download it again, or "
            "re-convert it with llama.cpp's convert_hf_to_gguf.py"
        ) from err
    metadata = {name: field.contents() for name, field in reader.fields.items()}

    loaders, shapes = {}, {}
    for tensor in reader.tensors:
        shape = tuple(int(n) for n in reversed(tensor.shape))
        shapes[tensor.name] = shape
        loaders[tensor.name] = functools.partial(_dequantize, path, tensor, shape)
    return metadata, TensorStore(path, loaders, shapes)


def _dequantize(path: Path, tensor, shape: tuple[int, ...]) -> np.ndarray:
    from gguf.quants import dequantize

    try:
        # A plain ndarray view: slicing a np.memmap pays a Python hook per slice, and the
        # dequantizer slices block by block (a third of the load time for SmolLM2).
        values = dequantize(tensor.data.view(np.ndarray), tensor.tensor_type)
    except NotImplementedError as err:
        raise CheckpointError(
            f"{path}: tensor {tensor.name!r} has quantization {tensor.tensor_type.name}, "
            f"which the gguf package cannot dequantize ({err})"
        ) from err
    if values.size != int(np.prod(shape, dtype=np.int64)):
        raise CheckpointError(
            f"{path}: tensor {tensor.name!r} dequantizes to {values.size} values, "
            f"but its shape {shape} holds {int(np.prod(shape))}"
        )
    return values.reshape(shape).astype(np.float32, copy=False)


def _field(metadata: dict, path: Path, key: str):
    value = metadata.get(key)
    if value is None:
        raise CheckpointError(f"{path}: GGUF metadata field {key!r} is missing")
    return value


def special_token_ids(metadata: dict) -> dict[str, int]:
    """{'bos'|'eos'|'eot'|'unknown'|'padding': id} for the `tokenizer.ggml.*_token_id` present."""
    ids = {}
    for kind in ("bos", "eos", "eot", "unknown", "padding"):
        value = metadata.get(f"tokenizer.ggml.{kind}_token_id")
        if value is not None:
            ids[kind] = int(value)
    return ids


def lm_config_from_gguf(metadata: dict, store: TensorStore, **overrides) -> LMConfig:
    """`LMConfig` from a GGUF file's `llama.*` metadata; `overrides` set neuron_layer, dtype..."""
    path = store.path
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(
            f"{path}: GGUF general.architecture={arch!r} is not supported (supported: 'llama')"
        )
    scaling = metadata.get("llama.rope.scaling.type", "none")
    if scaling != "none":
        raise CheckpointError(
            f"{path}: GGUF llama.rope.scaling.type={scaling!r} is not supported (supported: none)"
        )
    d_model = int(_field(metadata, path, "llama.embedding_length"))
    n_heads = int(_field(metadata, path, "llama.attention.head_count"))
    head_dim = int(metadata.get("llama.attention.key_length", d_model // n_heads))
    rotary_dim = int(metadata.get("llama.rope.dimension_count", head_dim))
    if rotary_dim != head_dim:
        # llama.cpp's Q/K permutation spans the whole head; a partial rotary would not survive it.
        raise CheckpointError(
            f"{path}: GGUF llama.rope.dimension_count={rotary_dim} differs from the head size "
            f"{head_dim}; only full rotary embeddings are supported"
        )
    embed_name = _GGUF_NAMES["model.embed_tokens.weight"]
    if embed_name not in store.names():
        raise CheckpointError(f"{path}: missing tensors ['{embed_name}']")
    vocab_size = store.shape(embed_name)[0]
    declared = metadata.get("llama.vocab_size")
    if declared is not None and int(declared) != vocab_size:
        raise CheckpointError(
            f"{path}: GGUF llama.vocab_size={declared} but {embed_name} has {vocab_size} rows"
        )
    ids = special_token_ids(metadata)
    eos = tuple(dict.fromkeys(ids[k] for k in ("eos", "eot") if k in ids))
    fields = dict(
        arch="llama",
        vocab_size=vocab_size,
        d_model=d_model,
        n_layers=int(_field(metadata, path, "llama.block_count")),
        n_heads=n_heads,
        n_kv_heads=int(metadata.get("llama.attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        d_ff=int(_field(metadata, path, "llama.feed_forward_length")),
        norm_eps=float(_field(metadata, path, "llama.attention.layer_norm_rms_epsilon")),
        rotary_dim=rotary_dim,
        rope_theta=float(metadata.get("llama.rope.freq_base", 10000.0)),
        max_position=int(metadata.get("llama.context_length", 2048)),
        tie_embeddings=_GGUF_NAMES["lm_head.weight"] not in store.names(),
        bos_token_id=ids.get("bos"),
        eos_token_ids=eos,
        pad_token_id=ids.get("padding", 0),
    )
    return make_lm_config(fields, path, overrides)


# ---- parameters -----------------------------------------------------------------------------


def _unpermuted(transform, n_heads: int):
    """`transform` applied after undoing llama.cpp's Q/K row permutation."""
    return lambda w: transform(unpermute_qk(w, n_heads))


def gguf_rules(config: LMConfig) -> list[Rule]:
    """`decoder_rules` for Llama with GGUF sources, Q/K rows put back into HF's order."""
    heads = {"attn/q/kernel": config.n_heads, "attn/k/kernel": config.n_kv_heads}
    rules = []
    for rule in decoder_rules(config):
        rule = dataclasses.replace(rule, source=_GGUF_NAMES[rule.source])
        n_heads = heads.get(rule.target.removeprefix("layers/"))
        if n_heads is not None:
            rule = dataclasses.replace(rule, transform=_unpermuted(rule.transform, n_heads))
        rules.append(rule)
    return rules


def load_gguf_decoder(path, *, shardings_fn=None, **overrides) -> tuple[LMConfig, dict, dict]:
    """Reads a Llama GGUF file into (`LMConfig`, params, metadata).

    Weights are dequantized to float32, then cast to `config.dtype` (float32 unless overridden).
    `overrides` go to the config (neuron_layer, neuron_activation, dtype, ...); the metadata is
    returned because it also holds the tokenizer (`tokenizer_from_gguf`).
    `shardings_fn(config, abstract_params)` may return a sharding tree for direct placement.
    """
    metadata, store = open_gguf(path)
    config = lm_config_from_gguf(metadata, store, **overrides)
    abstract = abstract_decoder_params(config)
    shardings = shardings_fn(config, abstract) if shardings_fn is not None else None
    params = load_params(store, gguf_rules(config), abstract, config.n_layers, shardings=shardings)
    return config, params, metadata
