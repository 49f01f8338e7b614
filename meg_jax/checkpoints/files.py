"""Lazy access to the tensors of a Hugging Face model directory.

Supported, in order of preference: `model.safetensors`, a sharded `model.safetensors.index.json`,
`flax_model.msgpack`, and `pytorch_model.bin` (only through torch with `weights_only=True`, and
only when torch is installed; nothing is unpickled otherwise).

Safetensors files are read with our own header parser into `np.memmap` views: no tensor is
loaded until asked for, a shard of a tensor reads only its bytes, and bfloat16 works (numpy has
no bfloat16; `ml_dtypes` provides it), which the `safetensors` numpy backend cannot do.
"""

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from meg_jax.checkpoints.errors import CheckpointError

_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


# What to do about a damaged weight file: a partial download or copy is the usual cause.
_REFETCH = "download or copy it again (or re-export it with save_pretrained)"


class TensorStore:
    """Named tensors of one checkpoint, read on demand; `path` is what errors cite."""

    def __init__(self, path: Path, loaders: dict, shapes: dict[str, tuple[int, ...]]):
        self.path = Path(path)
        self._loaders = loaders
        self._shapes = shapes

    def names(self) -> list[str]:
        return sorted(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        self._check(name)
        return self._shapes[name]

    def get(self, name: str) -> np.ndarray:
        """The tensor in its stored dtype (a memmap view for safetensors)."""
        self._check(name)
        return self._loaders[name]()

    def _check(self, name: str) -> None:
        if name not in self._shapes:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}")

    @classmethod
    def from_arrays(cls, path: Path, arrays: dict[str, np.ndarray]) -> "TensorStore":
        """A store over tensors already in memory (GGUF after dequantisation, torch .bin)."""
        return cls(
            path,
            {k: (lambda a=a: a) for k, a in arrays.items()},
            {k: tuple(a.shape) for k, a in arrays.items()},
        )


def _safetensors_entries(path: Path) -> tuple[dict, dict]:
    """Parses one .safetensors file into (loaders, shapes) backed by a shared memmap."""
    size = path.stat().st_size if path.is_file() else 0
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if 8 + header_len > size:
                raise CheckpointError(
                    f"{path}: truncated safetensors file ({size} bytes, but its header alone "
                    f"claims {header_len}); {_REFETCH}"
                )
            header = json.loads(f.read(header_len))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({err}); {_REFETCH}"
        ) from err
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object; {_REFETCH}")
    data_bytes = size - 8 - header_len
    # np.memmap refuses an empty range; a file of only empty tensors reads from an empty array.
    data = (
        np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
        if data_bytes > 0
        else np.zeros(0, np.uint8)
    )
    loaders, shapes = {}, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
            begin, end = (int(x) for x in info["data_offsets"])
            shape = tuple(int(n) for n in info["shape"])
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            raise CheckpointError(
                f"{path}: tensor {name!r} has a malformed header entry {info!r} ({err}); {_REFETCH}"
            ) from err
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        if (end - begin) != int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize:
            raise CheckpointError(f"{path}: tensor {name!r} byte range does not match its shape")
        if end > data_bytes:
            # The header is intact but the data stops early: an interrupted download or copy.
            raise CheckpointError(
                f"{path}: truncated safetensors file: tensor {name!r} needs bytes up to "
                f"{end} of the data section, which holds only {data_bytes}; {_REFETCH}"
            )
        loaders[name] = lambda b=begin, e=end, d=dtype, s=shape: data[b:e].view(d).reshape(s)
        shapes[name] = shape
    return loaders, shapes


def _flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(_flatten(value, name))
        else:
            out[name] = np.asarray(value)
    return out


def _torch_names(flax_tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF Flax leaf names -> the PyTorch names the key maps use (as HF's own flax->pt loader).

    A Dense `kernel` [in, out] is a Linear `weight` [out, in]; an Embed `embedding` and a
    LayerNorm `scale` are plain `weight`s. Leaves already named `weight`/`bias` (Flax Llama's
    RMSNorm) pass through.
    """
    out = {}
    for name, array in flax_tensors.items():
        stem, _, leaf = name.rpartition(".")
        if leaf == "kernel" and array.ndim == 2:
            name, array = f"{stem}.weight", array.T
        elif leaf in ("embedding", "scale"):
            name = f"{stem}.weight"
        out[name] = array
    return out


def _open_weights(directory: Path) -> TensorStore:
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    msgpack = directory / "flax_model.msgpack"
    torch_bin = directory / "pytorch_model.bin"
    if single.exists():
        loaders, shapes = _safetensors_entries(single)
        return TensorStore(single, loaders, shapes)
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index}: malformed index, need a 'weight_map' ({err})") from err
        loaders, shapes = {}, {}
        for shard in sorted(set(weight_map.values())):
            shard_path = directory / shard
            if not shard_path.exists():
                raise CheckpointError(f"{index}: shard {shard} is listed but missing")
            shard_loaders, shard_shapes = _safetensors_entries(shard_path)
            loaders.update(shard_loaders)
            shapes.update(shard_shapes)
        return TensorStore(index, loaders, shapes)
    if msgpack.exists():
        from flax import serialization

        tree = serialization.msgpack_restore(msgpack.read_bytes())
        return TensorStore.from_arrays(msgpack, _torch_names(_flatten(tree)))
    if torch_bin.exists():
        try:
            import torch
        except ImportError as err:
            raise CheckpointError(
                f"{torch_bin}: reading a PyTorch .bin needs torch; install it, or convert the "
                "checkpoint to safetensors"
            ) from err
        state = torch.load(torch_bin, map_location="cpu", weights_only=True)
        arrays = {
            k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()
        }
        return TensorStore.from_arrays(torch_bin, arrays)
    raise CheckpointError(
        f"{directory}: no weights found (expected model.safetensors, "
        "model.safetensors.index.json, flax_model.msgpack or pytorch_model.bin)"
    )


def open_hf_dir(path) -> tuple[dict, TensorStore]:
    """(config.json as a dict, lazy tensors) of a Hugging Face model directory."""
    directory = Path(path)
    config_path = directory / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{directory}: no config.json (is this a Hugging Face model dir?)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_path}: malformed JSON ({err})") from err
    return config, _open_weights(directory)
