"""The compiled programs of each MeG stage, built from shapes alone (nothing is allocated).

Axes: B edits / queries per batch, T tokens, N new tokens, D model width, P neuron length,
E condition width, G generator batch.

Every builder returns `Program`s: a traced (not yet compiled) jitted step whose inputs are
`jax.ShapeDtypeStruct`s carrying the shardings the real run places its arrays with, plus the
per-device bytes of its parameters and optimiser state. Compiling such a program runs XLA's
SPMD partitioner and buffer assignment for one device of the mesh, which is what
`memory.analyze` reads. The programs are the ones the stages run, not imitations:
  * collection: the frozen prefix (`Decoder.hidden_before`, once per batch) and the SGD fit
    (`collect.fit.sgd_fit`, forward and backward of the layers from the neuron layer up with
    respect to the per-edit neurons);
  * generator: `diffusion.train_step.make_train_step`, the donated AdamW update of the DiT;
  * evaluation: the prompt pass and the KV-cache decoding loop of `models.generate`.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from meg_jax.checkpoints.hf_decoder import abstract_decoder_params
from meg_jax.collect.fit import sgd_fit
from meg_jax.diffusion.config import GeneratorConfig
from meg_jax.diffusion.normalization import NormStats
from meg_jax.diffusion.train_step import TrainState, make_model, make_optimizer, make_train_step
from meg_jax.infra.sharding import DECODER_RULES, data_sharding, param_shardings, replicated
from meg_jax.models import generate
from meg_jax.models.config import LMConfig
from meg_jax.models.decoder import Decoder
from meg_jax.models.neuron import Neuron, neuron_vector_size


@dataclasses.dataclass(frozen=True)
class StageSizes:
    """The batch shapes a plan is made for (the defaults: the paper's prompts, our batches)."""

    edits_batch: int = 16  # edits fitted together in collection
    collect_tokens: int = 32  # query + answer, right-padded (zsRE/CounterFact fit in 32)
    eval_batch: int = 32  # queries per evaluation batch (ModelRunner's default)
    prompt_tokens: int = 32  # left-padded prompt
    new_tokens: int = 20  # greedy tokens (the reference's success test and AG)
    generator_batch: int = 256  # generator minibatch (the reference: whole bank, up to 5000)
    cond_width: int = 768  # bert-base-uncased [CLS]
    bank_edits: int = 10_000  # rows of the weight bank the generator trains on


@dataclasses.dataclass
class Program:
    """One traced step and what its inputs hold on each device."""

    name: str
    traced: Any  # jax.stages.Traced: its jaxpr for FLOPs, `.lower()` for the compiler
    param_bytes: int  # per device
    optimizer_bytes: int  # per device
    input_bytes: int  # per device: the other arguments (batch, neurons, KV cache, ...)
    tokens: int  # tokens (or generator samples) one call processes, for throughput
    note: str = ""


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded `ShapeDtypeStruct`s (the largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += int(np.prod(shape, dtype=np.int64)) * jnp.dtype(leaf.dtype).itemsize
    return total


def total_bytes(tree) -> int:
    """Bytes of a tree of arrays or `ShapeDtypeStruct`s, unsharded."""
    return sum(
        int(np.prod(leaf.shape, dtype=np.int64)) * jnp.dtype(leaf.dtype).itemsize
        for leaf in jax.tree.leaves(tree)
    )


def _sds(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=sharding)


def _batched(mesh: Mesh, shape, dtype) -> jax.ShapeDtypeStruct:
    return _sds(shape, dtype, data_sharding(mesh, len(shape)))


def abstract_host_params(config: LMConfig, mesh: Mesh):
    """The host LLM's parameters as `ShapeDtypeStruct`s with the decoder's shardings."""
    abstract = abstract_decoder_params(config)
    shardings = param_shardings(mesh, DECODER_RULES, abstract)
    return jax.tree.map(lambda a, s: _sds(a.shape, a.dtype, s), abstract, shardings)


def _neuron(mesh: Mesh, batch: int, d_model: int) -> Neuron:
    # Neurons stay float32 (the fit and the bank are float32) whatever the host's dtype.
    return Neuron(
        _batched(mesh, (batch, d_model), jnp.float32),
        _batched(mesh, (batch,), jnp.float32),
        _batched(mesh, (batch, d_model), jnp.float32),
    )


def collection_programs(config: LMConfig, mesh: Mesh, sizes: StageSizes) -> list[Program]:
    """The frozen prefix and one SGD step of `sizes.edits_batch` fits."""
    params = abstract_host_params(config, mesh)
    b, t = sizes.edits_batch, sizes.collect_tokens
    tokens = _batched(mesh, (b, t), jnp.int32)
    mask = _batched(mesh, (b, t), jnp.bool_)
    param_bytes = per_device_bytes(params)

    def prefix(params, tokens, mask):
        return Decoder(config).apply({"params": params}, tokens, mask, method=Decoder.hidden_before)

    hidden_sharding = data_sharding(mesh, 3)
    traced_prefix = jax.jit(prefix, out_shardings=hidden_sharding).trace(params, tokens, mask)
    hidden = _sds((b, t, config.d_model), config.jnp_dtype, hidden_sharding)
    lrs = _sds((1,), jnp.float32, replicated(mesh))  # one step; the scan's memory is per step
    # (hidden, mask, targets, loss mask, neurons, active rows, learning rates)
    fit_inputs = (
        hidden,
        mask,
        tokens,
        mask,
        _neuron(mesh, b, config.d_model),
        _batched(mesh, (b,), jnp.bool_),
        lrs,
    )
    traced_fit = sgd_fit.trace(config, params, *fit_inputs)
    return [
        Program(
            "collect/prefix",
            traced_prefix,
            param_bytes,
            0,
            per_device_bytes((tokens, mask)),
            b * t,
        ),
        # SGD has no optimiser state; the neurons being fitted are inputs, counted with them.
        Program(
            "collect/fit_step", traced_fit, param_bytes, 0, per_device_bytes(fit_inputs), b * t
        ),
    ]


def evaluation_programs(config: LMConfig, mesh: Mesh, sizes: StageSizes) -> list[Program]:
    """The prompt pass (cache filled) and the greedy decoding loop of one evaluation batch."""
    params = abstract_host_params(config, mesh)
    b, t, n = sizes.eval_batch, sizes.prompt_tokens, sizes.new_tokens
    stop_ids = tuple(config.eos_token_ids)
    # (shared prefix, prompts, prompt mask, neurons); the models.generate functions are module
    # private, used here because the plan must measure the very programs generation runs.
    prefill_inputs = (
        _sds((0,), jnp.int32, replicated(mesh)),
        _batched(mesh, (b, t), jnp.int32),
        _batched(mesh, (b, t), jnp.bool_),
        _neuron(mesh, b, config.d_model),
    )
    traced_prefill = generate._prefill.trace(
        config, params, *prefill_inputs, max_new_tokens=n, stop_ids=stop_ids
    )
    lowered_prefill = traced_prefill.lower()
    # The decoding loop takes the prompt pass's output state as it is placed.
    state = jax.tree.map(
        lambda info, sharding: _sds(info.shape, info.dtype, sharding),
        lowered_prefill.out_info,
        lowered_prefill.compile().output_shardings,
    )
    traced_decode = generate._decode.trace(config, params, state, stop_ids=stop_ids, pause_at=0)
    param_bytes = per_device_bytes(params)
    return [
        Program(
            "evaluate/prefill",
            traced_prefill,
            param_bytes,
            0,
            per_device_bytes(prefill_inputs),
            b * t,
        ),
        Program(
            "evaluate/decode",
            traced_decode,
            param_bytes,
            0,
            per_device_bytes(state),
            b * (n - 1),
            note="inputs: the KV cache of prompt + new tokens",
        ),
    ]


def abstract_generator_state(config: GeneratorConfig, length: int, cond_width: int, mesh: Mesh):
    """The generator's `TrainState` (params, AdamW moments, EMA) as replicated shapes."""
    model = make_model(config)
    optimizer = make_optimizer(config.optim, config.train.num_steps)

    def build(key):
        params = model.init(
            key,
            jnp.zeros((1, length), jnp.float32),
            jnp.zeros((1,), jnp.int32),
            jnp.ones((1, cond_width), jnp.float32),
        )["params"]
        ema = params if config.train.ema_decay > 0 else None
        norm = NormStats(
            jnp.zeros((length,), jnp.float32),
            jnp.ones((length,), jnp.float32),
            jnp.zeros((cond_width,), jnp.float32),
        )
        return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), ema, norm)

    shapes = jax.eval_shape(build, jax.ShapeDtypeStruct((2,), jnp.uint32))
    rep = replicated(mesh)
    return jax.tree.map(lambda a: _sds(a.shape, a.dtype, rep), shapes)


def generator_programs(
    config: GeneratorConfig, lm: LMConfig, mesh: Mesh, sizes: StageSizes
) -> list[Program]:
    """One AdamW step of the DiT on a minibatch of `sizes.generator_batch` neurons."""
    length = neuron_vector_size(lm.d_model, lm.neuron_has_bias)
    state = abstract_generator_state(config, length, sizes.cond_width, mesh)
    g = sizes.generator_batch
    # (x0, conditions, row mask, rng)
    batch = (
        _batched(mesh, (g, length), jnp.float32),
        _batched(mesh, (g, sizes.cond_width), jnp.float32),
        _batched(mesh, (g,), jnp.float32),
        _sds((2,), jnp.uint32, replicated(mesh)),
    )
    traced = make_train_step(config, mesh).trace(state, *batch)
    params = per_device_bytes(state.params)
    optimizer = per_device_bytes(state.opt_state) + per_device_bytes(state.ema_params)
    others = per_device_bytes((state.step, state.norm, batch))
    bank = sizes.bank_edits * (length + sizes.cond_width) * 4
    return [
        Program(
            "generator/train_step",
            traced,
            params,
            optimizer,
            others,
            g,
            note=f"host RAM per process, float32 bank and conditions: {bank / 2**30:.2f} GiB",
        )
    ]


def mesh_of(shape: tuple[int, int], devices=None) -> Mesh:
    """A ("data", "model") mesh of `shape` over the first data*model of `devices`.

    Raises with what to set when there are not enough devices (plans for 8 chips on a CPU need
    `--xla_force_host_platform_device_count=8` before JAX starts; `meg_jax.plan` sets it).
    """
    devices = list(jax.devices() if devices is None else devices)
    need = shape[0] * shape[1]
    if need > len(devices):
        raise ValueError(
            f"mesh {shape[0]}x{shape[1]} needs {need} devices, JAX has {len(devices)}; on a CPU "
            f"start Python with XLA_FLAGS=--xla_force_host_platform_device_count={need}"
        )
    return Mesh(np.asarray(devices[:need]).reshape(shape), ("data", "model"))
