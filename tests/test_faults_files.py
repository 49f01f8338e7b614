"""Damaged files are named, with the way out (issue 15, finding 6; finding 2 for weights).

Each case is a real file broken the way a crash, a partial download or a diverged run breaks
it: a safetensors file cut short, a GGUF of its first 1,000 bytes, a config.json without a
required field, a weight bank whose zip is cut or corrupted, and weights holding NaN. Before
the fix these surfaced as "cannot reshape array of size 0", an IndexError from the gguf package,
a KeyError, a BadZipFile without its path, or nothing at all.
"""

import json
import shutil

import numpy as np
import pytest
from hf_tiny import tiny_llama
from safetensors.numpy import load_file, save_file
from test_gguf import tiny_hf_llama, write_gguf

from meg_jax.checkpoints.errors import CheckpointError
from meg_jax.checkpoints.gguf_reader import load_gguf_decoder
from meg_jax.checkpoints.hf_decoder import load_hf_decoder
from meg_jax.collect.bank import WeightBank, load_bank, save_bank


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    _, path = tiny_llama(tmp_path_factory.mktemp("llama"))
    return path


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


# ---- safetensors ----------------------------------------------------------------------------


def test_truncated_safetensors_names_file_tensor_and_fix(llama_dir, tmp_path):
    path = _copy(llama_dir, tmp_path / "cut")
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        load_hf_decoder(path)
    message = str(info.value)
    assert str(weights) in message
    assert "truncated" in message and "tensor '" in message
    assert "download or copy it again" in message


def test_safetensors_cut_inside_header(llama_dir, tmp_path):
    path = _copy(llama_dir, tmp_path / "head")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated safetensors file"):
        load_hf_decoder(path)


def test_nan_tensor_in_safetensors_is_named(llama_dir, tmp_path):
    path = _copy(llama_dir, tmp_path / "nan")
    tensors = load_file(path / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name] = tensors[name].copy()
    tensors[name][3, 5] = np.nan
    tensors["model.norm.weight"] = tensors["model.norm.weight"].copy()
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError) as info:
        load_hf_decoder(path)
    message = str(info.value)
    assert str(path / "model.safetensors") in message
    assert repr(name) in message and "non-finite" in message


def test_inf_in_unstacked_tensor_is_named(llama_dir, tmp_path):
    path = _copy(llama_dir, tmp_path / "inf")
    tensors = load_file(path / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].copy()
    tensors["model.norm.weight"][0] = np.inf
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"tensor 'model\.norm\.weight' holds 1 non-finite"):
        load_hf_decoder(path)


# ---- config.json ----------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["num_hidden_layers", "vocab_size", "hidden_size"])
def test_config_without_required_field(llama_dir, tmp_path, field):
    path = _copy(llama_dir, tmp_path / field)
    config = json.loads((path / "config.json").read_text())
    del config[field]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as info:
        load_hf_decoder(path)
    message = str(info.value)
    assert str(path / "config.json") in message
    assert f"{field!r} is missing" in message and "copy it again" in message


def test_config_with_wrong_type(llama_dir, tmp_path):
    path = _copy(llama_dir, tmp_path / "type")
    config = json.loads((path / "config.json").read_text())
    config["hidden_size"] = "sixty-four"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError, match=r"config\.json: LMConfig\.d_model: expected a positive"
    ):
        load_hf_decoder(path)


# ---- GGUF -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", tiny_hf_llama(False))


@pytest.mark.parametrize("keep", [1000, 24, 5000, -10])
def test_truncated_gguf_names_file_and_fix(gguf_file, tmp_path, keep):
    path = tmp_path / "cut.gguf"
    data = gguf_file.read_bytes()
    path.write_bytes(data[:keep])
    with pytest.raises(CheckpointError) as info:
        load_gguf_decoder(path)
    message = str(info.value)
    assert str(path) in message and "truncated or damaged" in message
    assert "download it again" in message


def test_nan_tensor_in_gguf_is_named(tmp_path):
    model = tiny_hf_llama(False)
    with np.errstate(invalid="ignore"):
        weight = model.model.layers[2].mlp.down_proj.weight
        weight.data[0, 0] = float("nan")
    path = write_gguf(tmp_path / "nan.gguf", model)
    with pytest.raises(CheckpointError, match=r"nan\.gguf: tensor 'blk\.2\.ffn_down\.weight'"):
        load_gguf_decoder(path)


# ---- weight bank ----------------------------------------------------------------------------


def _bank(n: int = 4, p: int = 6) -> WeightBank:
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(n, p)).astype(np.float32)
    success = np.ones(n, bool)
    weights[1], success[1] = np.nan, False  # a failed fit: NaN on purpose, not damage
    return WeightBank(
        np.arange(100, 100 + n), weights, success, np.zeros(n, np.float32), np.zeros(p, np.float32)
    )


@pytest.mark.parametrize("damage", ["truncate", "garble", "empty"])
def test_damaged_bank_names_path_and_fix(tmp_path, damage):
    path = tmp_path / "bank.npz"
    save_bank(_bank(), path)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garble":
        data[len(data) // 3 : len(data) // 3 + 64] = b"\xff" * 64
    else:
        data = b""
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError) as info:
        load_bank(path)
    message = str(info.value)
    assert str(path) in message and "rerun the collection stage" in message


def test_bank_success_rows_must_be_finite(tmp_path):
    bank = _bank()
    save_bank(bank, tmp_path / "ok.npz")
    assert load_bank(tmp_path / "ok.npz").fitted.tolist() == [True, False, True, True]
    bank.weights[2, 0] = np.inf
    bank.weights[3, 1] = np.nan
    save_bank(bank, tmp_path / "bad.npz")
    with pytest.raises(ValueError, match=r"bad\.npz: 2 weight-bank row\(s\).*case ids 102, 103"):
        load_bank(tmp_path / "bad.npz")


def test_bank_init_must_be_finite(tmp_path):
    bank = _bank()
    bank.init[0] = np.nan
    save_bank(bank, tmp_path / "init.npz")
    with pytest.raises(ValueError, match=r"init\.npz: the bank's shared initial neuron"):
        load_bank(tmp_path / "init.npz")
