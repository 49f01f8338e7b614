"""Training state, optimiser, and the one jitted update of the weight generator.

Axes: B batch (padded to a multiple of the mesh's "data" size), P neuron vector length,
E condition width.

Parallelism is data-parallel only: parameters, optimiser state and EMA are replicated
(`PartitionSpec()`), the batch is split over the mesh's "data" axis, and XLA inserts the gradient
all-reduce. The update donates the old state, and derives all its randomness from
fold_in(rng, step), so it is a pure function of (state, batch) and a resumed run repeats an
uninterrupted one exactly.
"""

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from meg_jax.diffusion.config import GeneratorConfig, OptimConfig
from meg_jax.diffusion.dit import DiT1D
from meg_jax.diffusion.losses import training_losses
from meg_jax.diffusion.normalization import NormStats
from meg_jax.diffusion.process import q_sample
from meg_jax.diffusion.schedule import make_schedule
from meg_jax.infra.sharding import data_sharding, replicated


@flax.struct.dataclass
class TrainState:
    """Everything a checkpoint holds; `norm` is fixed after fitting but saved for sampling."""

    step: jnp.ndarray  # [] int32
    params: Any
    opt_state: Any
    ema_params: Any  # same tree as params, or None when EMA is off
    norm: NormStats


def learning_rate_schedule(config: OptimConfig, num_steps: int) -> optax.Schedule:
    """Linear warmup from 0, then constant or cosine down to end_lr_ratio * lr."""
    peak = config.learning_rate
    if config.schedule == "cosine":
        decay = config.decay_steps or num_steps
        return optax.warmup_cosine_decay_schedule(
            0.0,
            peak,
            config.warmup_steps,
            max(decay, config.warmup_steps + 1),
            end_value=peak * config.end_lr_ratio,
        )
    if config.warmup_steps:
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, config.warmup_steps), optax.constant_schedule(peak)],
            [config.warmup_steps],
        )
    return optax.constant_schedule(peak)


def make_optimizer(config: OptimConfig, num_steps: int) -> optax.GradientTransformation:
    """AdamW (PyTorch's betas and eps) after optional global-norm clipping."""
    adamw = optax.adamw(
        learning_rate_schedule(config, num_steps),
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=config.weight_decay,
    )
    if config.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw)
    return adamw


def make_model(config: GeneratorConfig) -> DiT1D:
    return DiT1D(config.dit, out_channels=config.diffusion.out_channels)


def init_state(
    config: GeneratorConfig, norm: NormStats, cond_width: int, rng: jax.Array, mesh: Mesh
) -> TrainState:
    """A fresh replicated state for neuron length P = len(norm.center)."""
    return _state_builder(config, cond_width, mesh)(rng, norm)


@functools.lru_cache(maxsize=8)
def _state_builder(config: GeneratorConfig, cond_width: int, mesh: Mesh):
    # Cached so that repeated runs in one process (resume, tests, sweeps) compile once.
    model = make_model(config)
    optimizer = make_optimizer(config.optim, config.train.num_steps)

    def build(key, norm):
        length = norm.center.shape[0]
        params = model.init(
            key,
            jnp.zeros((1, length), jnp.float32),
            jnp.zeros((1,), jnp.int32),
            jnp.ones((1, cond_width), jnp.float32),
        )["params"]
        ema = params if config.train.ema_decay > 0 else None
        return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), ema, norm)

    return jax.jit(build, out_shardings=replicated(mesh))


def ema_decay_at(decay: float, step: jnp.ndarray) -> jnp.ndarray:
    """min(decay, (1 + step) / (10 + step)): early on the EMA follows the weights closely, so a
    short run's EMA is not dominated by the random init (TF ExponentialMovingAverage's
    num_updates rule)."""
    step = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


@functools.lru_cache(maxsize=8)
def make_train_step(config: GeneratorConfig, mesh: Mesh):
    """The jitted update `(state, x0 [B, P], cond [B, E], mask [B], rng) -> (state, metrics)`.

    x0 is the normalised target; mask is 1 for real rows and 0 for padding. `state` is donated.
    Cached per (config, mesh), so a resumed run in the same process reuses the compiled update.
    """
    model = make_model(config)
    optimizer = make_optimizer(config.optim, config.train.num_steps)
    lr_at = learning_rate_schedule(config.optim, config.train.num_steps)
    sched = make_schedule(config.diffusion)
    diffusion = config.diffusion

    def update(state: TrainState, x0, cond, mask, rng):
        key_items, key_drop = jax.random.split(jax.random.fold_in(rng, state.step))
        # Row i's timestep and noise come from fold_in(key, i): padding rows appended to a batch
        # (to fill the mesh) leave the real rows' draws unchanged.
        keys = jax.vmap(jax.random.fold_in, (None, 0))(key_items, jnp.arange(mask.shape[0]))
        t = jax.vmap(lambda k: jax.random.randint(k, (), 0, diffusion.num_timesteps))(keys)
        noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), x0.shape[1:]))(keys)
        x_t = q_sample(sched, x0, t, noise)
        count = jnp.maximum(mask.sum(), 1.0)

        def loss_fn(params):
            out = model.apply(
                {"params": params}, x_t, t, cond, train=True, rngs={"dropout": key_drop}
            )
            terms = training_losses(sched, diffusion, out, x0, noise, x_t, t)
            means = jax.tree.map(lambda v: jnp.sum(v * mask) / count, terms)
            return means.loss, means

        grads, terms = jax.grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema is not None:
            decay = ema_decay_at(config.train.ema_decay, state.step)
            ema = optax.incremental_update(params, ema, 1.0 - decay)
        metrics = {
            "loss": terms.loss,
            "mse": terms.mse,
            "vb": terms.vb,
            "grad_norm": optax.global_norm(grads),
            "lr": lr_at(state.step),
        }
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema
        )
        return new_state, metrics

    rep = replicated(mesh)
    rows, vectors = data_sharding(mesh, 1), data_sharding(mesh, 2)
    return jax.jit(
        update,
        in_shardings=(rep, vectors, vectors, rows, rep),
        out_shardings=(rep, rep),
        donate_argnums=0,
    )


def sampling_params(state: TrainState) -> Any:
    """The parameters to sample with: the EMA when kept, else the raw ones."""
    return state.params if state.ema_params is None else state.ema_params
