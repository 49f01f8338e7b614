"""Meshes, partition rules and batch placement: the project's one parallelism mechanism.

A mesh has two axes: "data" (batch) and "model" (tensor parallelism of the host LLM's weights).
Partition rules are ordered (regex, PartitionSpec) pairs matched against '/'-joined parameter
paths; the first match wins and a parameter that matches none is an error, so a new parameter
can never silently end up replicated (or worse, wrongly split).
"""

import re
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from meg_jax.infra.distributed import device_put_global
from meg_jax.infra.trees import flatten_tree, unflatten_tree

PartitionRules = Sequence[tuple[str, P]]

# The host decoders (meg_jax.models.decoder). Layer parameters carry a leading layer axis.
DECODER_RULES: PartitionRules = (
    (r"embed/embedding", P(None, "model")),
    (r"layers/attn/(q|k|v)/kernel", P(None, None, "model")),
    (r"layers/attn/(q|k|v)/bias", P(None, "model")),
    (r"layers/attn/o/kernel", P(None, "model", None)),
    (r"layers/attn/o/bias", P(None, None)),
    (r"layers/mlp/(gate|up|fc_in)/kernel", P(None, None, "model")),
    (r"layers/mlp/fc_in/bias", P(None, "model")),
    (r"layers/mlp/(down|fc_out)/kernel", P(None, "model", None)),
    (r"layers/mlp/fc_out/bias", P(None, None)),
    (r"layers/(input_norm|post_attn_norm)/(scale|bias)", P(None, None)),
    (r"final_norm/(scale|bias)", P(None)),
    (r"lm_head/kernel", P(None, "model")),
    (r"lm_head/bias", P("model")),
)


def make_mesh(data: int = -1, model: int = 1, devices=None) -> Mesh:
    """A ("data", "model") mesh over `devices` (default: all); -1 takes what is left for data."""
    devices = list(jax.devices() if devices is None else devices)
    if data == -1:
        if len(devices) % model:
            raise ValueError(f"{len(devices)} devices do not split into model={model}")
        data = len(devices) // model
    if data * model != len(devices):
        raise ValueError(f"mesh {data}x{model} needs {data * model} devices, have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(data, model), ("data", "model"))


def match_partition_rules(rules: PartitionRules, params) -> dict:
    """A PartitionSpec tree for `params` (arrays or ShapeDtypeStructs); raises on no match."""
    specs = {}
    for path, leaf in flatten_tree(params).items():
        for pattern, spec in rules:
            if re.fullmatch(pattern, path):
                if len(spec) > len(leaf.shape):
                    raise ValueError(f"rule {pattern!r} gives {spec} to {path} of rank {leaf.ndim}")
                specs[path] = spec
                break
        else:
            raise ValueError(f"parameter {path} (shape {leaf.shape}) matches no partition rule")
    return unflatten_tree(specs)


def _fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """`spec` with each split dimension that the mesh axis does not divide left whole.

    E.g. GPT-2's vocabulary of 50257 cannot be split over 2 devices; the tensor is then
    replicated along that dimension rather than refused.
    """
    fitted = []
    for dim, axis in enumerate(spec):
        size = mesh.shape[axis] if isinstance(axis, str) else 1
        fitted.append(axis if shape[dim] % size == 0 else None)
    return P(*fitted)


def param_shardings(mesh: Mesh, rules: PartitionRules, params) -> dict:
    """NamedShardings for `params` under `rules` on `mesh`."""
    specs = flatten_tree(match_partition_rules(rules, params))
    shapes = {path: leaf.shape for path, leaf in flatten_tree(params).items()}
    return unflatten_tree(
        {
            path: NamedSharding(mesh, _fit_spec(spec, shapes[path], mesh))
            for path, spec in specs.items()
        }
    )


def data_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Batch-major arrays: the leading axis split over "data", the rest replicated."""
    return NamedSharding(mesh, P("data", *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_batch(mesh: Mesh, tree):
    """Places every array of `tree` with its leading (batch) axis over the "data" axis."""
    return jax.tree.map(lambda x: device_put_global(x, data_sharding(mesh, np.ndim(x))), tree)
