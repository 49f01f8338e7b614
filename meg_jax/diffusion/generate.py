"""Public sampling API: condition vectors in, raw neuron weights out.

Axes: B queries, E condition width, P neuron vector length, K sampling steps.

`generate` samples x0 with the configured sampler (a jitted `lax.scan`, compiled once per
config and chunk size), inverts the weight normalisation, and returns raw weights ready for the
host LLM's neuron slot. Large B is processed in fixed-size chunks (the last one padded) so one
compiled program serves any number of queries. Row i's noise comes from fold_in(rng, ids[i])
(`ids` defaults to the row index): a caller that passes ids derived from the query itself (the
editor hashes the query text) gets a sample that depends on the query and the seed only, never on
which other queries share the call. A fixed `chunk_size` also fixes the compiled shape, so the row
runs the same program whatever the number of queries.

`save_generator` / `load_generator_params` keep the sampling parameters as one msgpack file beside
the run's `generator.json`: the artefact inference loads, apart from the training checkpoints.
"""

import functools
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization
from jax.sharding import Mesh

from meg_jax.diffusion.config import DiffusionConfig, DiTConfig, GeneratorConfig, SamplerConfig
from meg_jax.diffusion.dit import DiT1D
from meg_jax.diffusion.normalization import NormStats, center_conditions, denormalize
from meg_jax.diffusion.samplers import sample_loop
from meg_jax.diffusion.schedule import make_schedule
from meg_jax.diffusion.train_step import TrainState, sampling_params
from meg_jax.infra.distributed import gather_to_host
from meg_jax.infra.files import write_bytes_atomic
from meg_jax.infra.sharding import data_sharding, replicated, shard_batch


class GeneratorParams(NamedTuple):
    """What sampling needs from a trained generator: network parameters and the weight map."""

    params: Any
    norm: NormStats


def as_generator_params(params_or_state: GeneratorParams | TrainState) -> GeneratorParams:
    """A `TrainState` becomes its sampling parameters (the EMA when kept) and statistics."""
    if isinstance(params_or_state, TrainState):
        return GeneratorParams(sampling_params(params_or_state), params_or_state.norm)
    if isinstance(params_or_state, GeneratorParams):
        return params_or_state
    raise TypeError(
        f"generate: expected a GeneratorParams or TrainState, got {type(params_or_state).__name__}"
    )


@functools.lru_cache(maxsize=16)
def _chunk_sampler(
    dit: DiTConfig, diffusion: DiffusionConfig, sampler: SamplerConfig, mesh: Mesh | None
):
    """Jitted (params, norm, cond [B, E], index [B], rng) -> raw weights [B, P]."""
    model = DiT1D(dit, out_channels=diffusion.out_channels)
    sched = make_schedule(diffusion, sampler.steps)

    def run(params, norm: NormStats, cond, index, rng):
        length = norm.center.shape[0]
        shared_key, items_key = jax.random.split(rng)
        item_keys = jax.vmap(jax.random.fold_in, (None, 0))(items_key, index)  # [B] keys
        if sampler.shared_noise:
            x_T = jnp.broadcast_to(jax.random.normal(shared_key, (length,)), (len(index), length))
        else:
            # Tag K is past the last step index, so x_T's draw never repeats a step's noise.
            x_T = jax.vmap(
                lambda key: jax.random.normal(jax.random.fold_in(key, sched.num_steps), (length,))
            )(item_keys)

        def apply_fn(x_t, t, c):
            return model.apply({"params": params}, x_t, t, c)

        cond = center_conditions(norm, cond)
        x0 = sample_loop(apply_fn, sched, diffusion, sampler, cond, x_T, item_keys)
        return denormalize(norm, x0)

    if mesh is None:
        return jax.jit(run)
    rep, rows, vectors = replicated(mesh), data_sharding(mesh, 1), data_sharding(mesh, 2)
    return jax.jit(run, in_shardings=(rep, rep, vectors, rows, rep), out_shardings=vectors)


def generate(
    params_or_state: GeneratorParams | TrainState,
    conditions: np.ndarray | jnp.ndarray,
    rng: jax.Array,
    config: GeneratorConfig,
    sampler: SamplerConfig | None = None,
    mesh: Mesh | None = None,
    ids: np.ndarray | None = None,
    chunk_size: int | None = None,
) -> jnp.ndarray:
    """Samples raw neuron weights [B, P] for condition vectors `conditions` [B, E].

    `sampler` overrides `config.sampler` (e.g. the training criterion's); with `mesh`, each chunk
    is split over its "data" axis (the chunk is rounded up to a multiple of its size). `ids` [B]
    (uint32) name each row's noise (default: its index); `chunk_size` fixes the compiled batch
    (default: `sampler.chunk_size`, shrunk to B).

    When the mesh spans several processes the samples are gathered whole to every process (as
    numpy); the chunks go in as host values, which every process holds alike.
    """
    gen = as_generator_params(params_or_state)
    sampler = sampler or config.sampler
    conditions = np.asarray(gather_to_host(conditions), np.float32)
    if conditions.ndim != 2 or conditions.shape[0] == 0:
        raise ValueError(f"generate: conditions must be [B >= 1, E], got {conditions.shape}")
    expected = _condition_width(gen.params, config.dit)
    if conditions.shape[1] != expected:
        raise ValueError(
            f"generate: conditions have width {conditions.shape[1]}, the generator expects "
            f"{expected}"
        )
    total = conditions.shape[0]
    ids = np.arange(total, dtype=np.uint32) if ids is None else np.asarray(ids, np.uint32)
    if ids.shape != (total,):
        raise ValueError(f"generate: ids of shape {ids.shape}, expected ({total},)")
    shards = 1 if mesh is None else mesh.shape["data"]
    chunk = chunk_size if chunk_size is not None else min(sampler.chunk_size, total)
    chunk = -(-chunk // shards) * shards
    run = _chunk_sampler(config.dit, config.diffusion, sampler, mesh)
    outputs = []
    for start in range(0, total, chunk):
        cond = conditions[start : start + chunk]
        real = cond.shape[0]
        index = np.pad(ids[start : start + chunk], (0, chunk - real))
        if real < chunk:  # pad the last chunk so the compiled shape is reused
            cond = np.pad(cond, ((0, chunk - real), (0, 0)))
        if mesh is not None:  # jit takes no host array for a split input across processes
            cond, index = shard_batch(mesh, (cond, index))
        out = run(gen.params, gen.norm, cond, index, rng)
        outputs.append(out[:real] if out.is_fully_addressable else gather_to_host(out)[:real])
    return jnp.concatenate(outputs, axis=0) if len(outputs) > 1 else outputs[0]


def _condition_width(params: Any, dit: DiTConfig) -> int:
    """E the network was built for: cond_proj's input width, or the hidden width without it."""
    proj = params.get("cond_proj") if hasattr(params, "get") else None
    return int(proj["kernel"].shape[0]) if proj is not None else dit.hidden


def save_generator(params_or_state: GeneratorParams | TrainState, path: str | Path) -> None:
    """Writes the sampling parameters (EMA when kept) and weight map to `path`, atomically."""
    gen = as_generator_params(params_or_state)
    tree = {"params": jax.device_get(gen.params), "norm": jax.device_get(gen.norm._asdict())}
    write_bytes_atomic(path, serialization.msgpack_serialize(tree))


def load_generator_params(path: str | Path) -> GeneratorParams:
    """The sampling parameters written by `save_generator`."""
    path = Path(path)
    try:
        tree = serialization.msgpack_restore(path.read_bytes())
        return GeneratorParams(tree["params"], NormStats(**tree["norm"]))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"{path}: not a readable generator ({type(err).__name__}: {err}); rerun the "
            "generator stage (--config.stage=generator --config.generator.retrain=True)"
        ) from None
