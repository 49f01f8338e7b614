"""Checkpoint tensors -> a Flax parameter tree, through key maps written as data.

A key map is a list of `Rule`s: the target path in our parameter tree, the source tensor name
(with `{i}` for the layer index when the target is a stack of layers), and a small transform
(transpose a torch Linear weight, undo a head permutation, ...). `load_params` is strict in both
directions: every parameter needs a rule, every rule's tensor must exist, every tensor in the
file must be used or explicitly ignored, and shapes must agree. Each tensor is placed straight
into its shards with `jax.make_array_from_callback`: a device receives only the slice it holds,
so the full model never sits on one device.
"""

import dataclasses
import re
from collections.abc import Callable, Sequence

import jax
import ml_dtypes
import numpy as np
from jax.sharding import SingleDeviceSharding

from meg_jax.checkpoints.errors import CheckpointError
from meg_jax.checkpoints.files import TensorStore
from meg_jax.infra.trees import flatten_tree, unflatten_tree


def identity(array: np.ndarray) -> np.ndarray:
    return array


def transpose(array: np.ndarray) -> np.ndarray:
    """torch Linear weight [out, in] -> Flax Dense kernel [in, out]."""
    return array.T


@dataclasses.dataclass(frozen=True)
class Rule:
    """Where one parameter comes from: `target` is '/'-joined, `source` may contain `{i}`."""

    target: str
    source: str
    transform: Callable[[np.ndarray], np.ndarray] = identity
    stacked: bool = False

    def sources(self, n_layers: int) -> list[str]:
        if self.stacked:
            return [self.source.format(i=i) for i in range(n_layers)]
        return [self.source]


def _transformed_shape(rule: Rule, shape: tuple[int, ...]) -> tuple[int, ...]:
    # A zero-stride stand-in: transforms are views/reshapes, so this reads no checkpoint bytes.
    return rule.transform(np.broadcast_to(np.zeros((), np.float32), shape)).shape


def _check_rules(store, rules, abstract, n_layers, ignore) -> dict[str, Rule]:
    by_target = {}
    for rule in rules:
        if rule.target not in abstract:
            continue  # rules for optional parts (e.g. biases) the config switched off
        if rule.target in by_target:
            raise CheckpointError(f"{store.path}: two key-map rules for parameter {rule.target}")
        by_target[rule.target] = rule
    no_rule = sorted(set(abstract) - set(by_target))
    if no_rule:
        raise CheckpointError(f"{store.path}: no key-map rule for parameters {no_rule}")
    names = set(store.names())
    used, missing = set(), []
    for target, rule in by_target.items():
        leaf = abstract[target]
        for source in rule.sources(n_layers):
            if source not in names:
                missing.append(source)
                continue
            used.add(source)
            got = _transformed_shape(rule, store.shape(source))
            want = tuple(leaf.shape[1:] if rule.stacked else leaf.shape)
            if got != want:
                raise CheckpointError(
                    f"{store.path}: tensor {source!r} has shape {store.shape(source)} "
                    f"(-> {got} after transform), but parameter {target} expects {want}"
                )
    if missing:
        raise CheckpointError(f"{store.path}: missing tensors {sorted(missing)}")
    patterns = [re.compile(p) for p in ignore]
    unexpected = sorted(n for n in names - used if not any(p.fullmatch(n) for p in patterns))
    if unexpected:
        raise CheckpointError(f"{store.path}: unexpected tensors {unexpected}")
    return by_target


def _finite(store: TensorStore, name: str, array: np.ndarray) -> np.ndarray:
    """`array` (the slice of tensor `name` being placed), or an error if it holds NaN or inf.

    A non-finite weight poisons every activation after it, and the run would end in empty
    predictions with no hint why; checking here costs one pass over bytes being copied anyway.
    """
    if np.issubdtype(array.dtype, np.inexact) or array.dtype == ml_dtypes.bfloat16:
        bad = ~np.isfinite(array)
        if bad.any():
            raise CheckpointError(
                f"{store.path}: tensor {name!r} holds {int(bad.sum())} non-finite value(s) "
                "(NaN or inf); the checkpoint is damaged or was saved from a diverged run. "
                "Use an intact copy of the weights"
            )
    return array


def load_params(
    store: TensorStore,
    rules: Sequence[Rule],
    abstract_params,
    n_layers: int,
    *,
    shardings=None,
    dtype=None,
    ignore: Sequence[str] = (),
):
    """Reads `store` into a parameter tree shaped like `abstract_params` (from `jax.eval_shape`).

    `shardings` (a tree matching the parameters, e.g. from `meg_jax.infra.sharding`) places each
    tensor's slices on their devices; by default everything goes to the first device. `dtype`
    overrides the abstract dtypes. `ignore` lists regexes of file tensors that are not used on
    purpose (e.g. a BERT pooler, rotary caches).
    """
    abstract = flatten_tree(abstract_params)
    flat_shardings = flatten_tree(shardings) if shardings is not None else None
    by_target = _check_rules(store, rules, abstract, n_layers, ignore)
    default = SingleDeviceSharding(jax.local_devices()[0])
    out = {}
    for target, rule in by_target.items():
        leaf = abstract[target]
        target_dtype = np.dtype(dtype or leaf.dtype)
        sources = rule.sources(n_layers)

        def read(index, rule=rule, sources=sources, target_dtype=target_dtype):
            if rule.stacked:
                layer_ids = range(len(sources))[index[0]]
                parts = [
                    _finite(store, sources[i], rule.transform(store.get(sources[i]))[index[1:]])
                    for i in layer_ids
                ]
                return np.stack(parts).astype(target_dtype)
            part = _finite(store, sources[0], rule.transform(store.get(sources[0]))[index])
            return np.asarray(part, dtype=target_dtype)

        sharding = flat_shardings[target] if flat_shardings is not None else default
        out[target] = jax.make_array_from_callback(tuple(leaf.shape), sharding, read)
    return unflatten_tree(out)
