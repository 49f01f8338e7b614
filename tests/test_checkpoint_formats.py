"""Checkpoint reading: every file format gives the same parameters; bad files, clear errors.

The formats are written here independently of our reader: `save_pretrained` for safetensors
(single and sharded), `torch.save` of the state dict for `pytorch_model.bin` (transformers v5 no
longer writes .bin), and a msgpack of the tree HF's Flax models use (nested module dicts, Dense
`kernel` [in, out], Embed `embedding`, LayerNorm `scale`), as `convert_pytorch_state_dict_to_flax`
would produce it.
"""

import json
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import serialization
from hf_tiny import tiny_gptj, tiny_llama
from safetensors.numpy import load_file, save_file

from meg_jax.checkpoints.errors import CheckpointError
from meg_jax.checkpoints.hf_decoder import load_hf_decoder

TINY = {"llama": tiny_llama, "gptj": tiny_gptj}


def _flax_tree(model: torch.nn.Module) -> dict:
    """The HF Flax parameter tree of a PyTorch model, nested by the dots of the torch names."""
    tree: dict = {}
    for name, tensor in model.state_dict().items():
        *modules, leaf = name.split(".")
        array = tensor.detach().numpy()
        module = model.get_submodule(".".join(modules))
        if isinstance(module, torch.nn.Linear) and leaf == "weight":
            leaf, array = "kernel", array.T
        elif isinstance(module, torch.nn.Embedding):
            leaf = "embedding"
        elif isinstance(module, torch.nn.LayerNorm) and leaf == "weight":
            leaf = "scale"
        node = tree
        for part in modules:
            node = node.setdefault(part, {})
        node[leaf] = np.ascontiguousarray(array)
    return tree


def _config_only(src, dst):
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    return dst


@pytest.fixture(scope="module", params=sorted(TINY))
def formats(request, tmp_path_factory):
    """(torch model, {format name: model dir}) for one tiny architecture."""
    root = tmp_path_factory.mktemp(request.param)
    model, single = TINY[request.param](root / "safetensors")
    _, sharded = TINY[request.param](root / "sharded", max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert not (sharded / "model.safetensors").exists()
    torch_bin = _config_only(single, root / "bin")
    torch.save(model.state_dict(), torch_bin / "pytorch_model.bin")
    msgpack = _config_only(single, root / "msgpack")
    (msgpack / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(_flax_tree(model)))
    dirs = {"safetensors": single, "sharded": sharded, "bin": torch_bin, "msgpack": msgpack}
    return model, dirs


def _numpy_tree(params) -> dict:
    return jax.tree.map(np.asarray, params)


def test_all_formats_give_identical_params(formats):
    model, dirs = formats
    loaded = {name: load_hf_decoder(path) for name, path in dirs.items()}
    cfg0, params0 = loaded["safetensors"]
    ref = _numpy_tree(params0)
    # Independent spot check against the torch tensors (the key map's transpose and stacking).
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    embed = "transformer.wte.weight" if cfg0.arch == "gptj" else "model.embed_tokens.weight"
    np.testing.assert_array_equal(ref["embed"]["embedding"], sd[embed])
    np.testing.assert_array_equal(ref["lm_head"]["kernel"], sd["lm_head.weight"].T)
    for name, (cfg, params) in loaded.items():
        assert cfg == cfg0, name
        got = _numpy_tree(params)
        assert jax.tree.structure(got) == jax.tree.structure(ref), name
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
            assert a.dtype == b.dtype == np.float32, name
            np.testing.assert_array_equal(a, b, err_msg=name)


def test_bfloat16_safetensors(tmp_path):
    model, _ = tiny_llama(tmp_path / "f32")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    header_len = int.from_bytes(
        (tmp_path / "bf16" / "model.safetensors").read_bytes()[:8], "little"
    )
    header = json.loads((tmp_path / "bf16" / "model.safetensors").read_bytes()[8 : 8 + header_len])
    assert header["model.norm.weight"]["dtype"] == "BF16"
    q_bf16 = model.model.layers[1].self_attn.q_proj.weight.float().detach().numpy()

    cfg, params = load_hf_decoder(tmp_path / "bf16", dtype="bfloat16")
    kernel = np.asarray(params["layers"]["attn"]["q"]["kernel"])
    assert cfg.dtype == "bfloat16" and kernel.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(kernel[1].astype(np.float32), q_bf16.T)

    # Read as float32 (the default dtype): the same values, upcast exactly.
    _, params32 = load_hf_decoder(tmp_path / "bf16")
    kernel32 = np.asarray(params32["layers"]["attn"]["q"]["kernel"])
    assert kernel32.dtype == np.float32
    np.testing.assert_array_equal(kernel32[1], q_bf16.T)


# ---- bad checkpoints --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """(config.json dict, tensors) of a valid tiny Llama, to be broken one way per test."""
    _, path = tiny_llama(tmp_path_factory.mktemp("good"))
    config = json.loads((path / "config.json").read_text())
    return config, load_file(path / "model.safetensors")


def _write(path, config: dict | None, tensors: dict | None):
    path.mkdir()
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    if tensors is not None:
        save_file(tensors, path / "model.safetensors")
    return path


def _error(path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_hf_decoder(path)
    return str(info.value)


def test_missing_tensor(good, tmp_path):
    config, tensors = good
    name = "model.layers.1.mlp.up_proj.weight"
    path = _write(tmp_path / "m", config, {k: v for k, v in tensors.items() if k != name})
    msg = _error(path)
    assert str(path / "model.safetensors") in msg and name in msg and "missing" in msg


def test_unexpected_tensor(good, tmp_path):
    config, tensors = good
    extra = {**tensors, "model.layers.0.mlp.extra_proj.weight": np.zeros((1, 64), np.float32)}
    msg = _error(_write(tmp_path / "m", config, extra))
    assert "model.safetensors" in msg and "extra_proj" in msg and "unexpected" in msg


def test_wrong_shape(good, tmp_path):
    config, tensors = good
    name = "model.layers.2.self_attn.k_proj.weight"
    broken = {**tensors, name: np.zeros((16, 64), np.float32)}
    msg = _error(_write(tmp_path / "m", config, broken))
    assert "model.safetensors" in msg and name in msg and "(16, 64)" in msg


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"model_type": "gpt2"}, ["gpt2", "architecture"]),
        ({"hidden_act": "relu"}, ["hidden_act", "relu"]),
        # Hub files (transformers v4) carry `rope_scaling`; v5 writes `rope_parameters`.
        ({"rope_scaling": {"type": "yarn", "factor": 4.0}, "rope_parameters": None}, ["yarn"]),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, ["yarn"]),
    ],
    ids=["unknown-arch", "relu", "yarn-v4", "yarn-v5"],
)
def test_unsupported_config(good, tmp_path, change, words):
    config, tensors = good
    config = {**config, **change}
    msg = _error(_write(tmp_path / "m", config, tensors))
    assert str(tmp_path / "m" / "config.json") in msg
    for word in words:
        assert word in msg


def test_no_config(good, tmp_path):
    msg = _error(_write(tmp_path / "m", None, good[1]))
    assert str(tmp_path / "m") in msg and "config.json" in msg


def test_no_weights(good, tmp_path):
    msg = _error(_write(tmp_path / "m", good[0], None))
    assert str(tmp_path / "m") in msg and "no weights" in msg


@pytest.mark.parametrize("index", ["{not json", '{"metadata": {}}'], ids=["bad-json", "no-map"])
def test_malformed_index(good, tmp_path, index):
    path = _write(tmp_path / "m", good[0], None)
    (path / "model.safetensors.index.json").write_text(index)
    msg = _error(path)
    assert "model.safetensors.index.json" in msg and "malformed" in msg


def test_index_names_missing_shard(good, tmp_path):
    path = _write(tmp_path / "m", good[0], None)
    weight_map = {name: "model-00001-of-00002.safetensors" for name in good[1]}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    msg = _error(path)
    assert "model-00001-of-00002.safetensors" in msg and "missing" in msg
