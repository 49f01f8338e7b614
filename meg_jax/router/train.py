"""Stage 2: train the Familiarity Network on random labels of the edit queries; the `Router`.

Axes: N edit queries, B batch, E encoder width, K classes.

Inputs are the [CLS] vectors of the *raw* edit queries (no prompt template, not normalised;
METHOD.md §2.3) from the tuned encoder, which is frozen here. Each query gets a label drawn
uniformly from K classes with `seed` (the reference's labels come from an unseeded
`random.randint`; ours are reproducible). Loss: cross-entropy; optimiser: AdamW, lr 1e-3.

Epochs are seeded permutations; the last, short batch of an epoch is padded to the full batch
with zero-weight rows, so every step has one shape and the padded rows change nothing.
Dropout keys are `fold_in(seed, step)`, so a resumed run continues exactly where it stopped.
"""

import dataclasses
import functools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from tqdm.auto import tqdm

from meg_jax.infra import runs
from meg_jax.infra.distributed import device_put_global
from meg_jax.infra.sharding import make_mesh, replicated, shard_batch
from meg_jax.router.batches import padded_rows
from meg_jax.router.gate import Router
from meg_jax.router.network import FamiliarityConfig, FamiliarityNet


@dataclasses.dataclass(frozen=True)
class RouterTrainConfig:
    """Settings of the router stage (reference values in METHOD.md §2.3).

    Attributes:
      n_classes, n_blocks, expansion, dropout: the network (K = 10, 5 blocks, 4x, 0.1).
      learning_rate, weight_decay: AdamW (reference lr 1e-3; torch's default decay 0.01).
      batch_size: 1024 in the reference for N <= 4096 (2000 for N = 10000).
      num_epochs: the reference trains 1000-4000 epochs; the loss must reach ~0 (memorised).
      seed: labels, initialisation, shuffling and dropout.
      threshold: epsilon of the gate before calibration (reference: 0.1 Phi-2, 0.3-0.7 others).
      save_every: steps between checkpoints (and the end of training).
      log_every: steps between metric lines.
    """

    n_classes: int = 10
    n_blocks: int = 5
    expansion: int = 4
    dropout: float = 0.1
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 1024
    num_epochs: int = 300
    seed: int = 42
    threshold: float = 0.1
    save_every: int = 200
    log_every: int = 10
    max_to_keep: int = 2

    def __post_init__(self):
        least = {
            "n_classes": 2,
            "n_blocks": 1,
            "expansion": 1,
            "batch_size": 1,
            "num_epochs": 1,
            "save_every": 1,
            "log_every": 1,
            "max_to_keep": 1,
        }
        for name, bound in least.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < bound:
                raise ValueError(f"router.{name}: expected an integer >= {bound}, got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"router.dropout: expected a value in [0, 1), got {self.dropout!r}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"router.learning_rate: expected > 0, got {self.learning_rate!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"router.weight_decay: expected >= 0, got {self.weight_decay!r}")
        # The gate routes a query when its entropy (in nats) is below this: 0 routes nothing.
        if not (math.isfinite(self.threshold) and self.threshold > 0):
            raise ValueError(f"router.threshold: expected a number > 0, got {self.threshold!r}")

    def network(self, width: int) -> FamiliarityConfig:
        return FamiliarityConfig(width, self.n_blocks, self.expansion, self.n_classes, self.dropout)


def random_labels(n: int, n_classes: int, seed: int) -> np.ndarray:
    """The seeded random class of each of n edit queries, int32 [n]."""
    return np.random.default_rng(seed).integers(0, n_classes, size=n).astype(np.int32)


def _batch(step: int, n: int, batch: int, rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices [rows], weights [rows]) of `step`: `batch` examples, zero-weight padded to `rows`.

    The batch content depends only on (seed, step, batch), not on `rows`, so training is the
    same on any number of devices; the short tail batch of an epoch is padded the same way.
    """
    per_epoch = -(-n // batch)
    epoch, k = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)[k * batch : (k + 1) * batch]
    weights = np.zeros(rows, np.float32)
    weights[: len(order)] = 1.0
    return np.pad(order, (0, rows - len(order))), weights


def _optimizer(learning_rate: float, weight_decay: float) -> optax.GradientTransformation:
    return optax.adamw(learning_rate, weight_decay=weight_decay)


@functools.lru_cache(maxsize=8)
def _train_step(net_config: FamiliarityConfig, learning_rate: float, weight_decay: float, mesh):
    """The jitted update, cached so repeated trainings (resume, calibration) compile once."""
    net = FamiliarityNet(net_config)
    tx = _optimizer(learning_rate, weight_decay)

    def step_fn(state, key, xb, yb, wb):
        """xb[B, E], yb[B] labels, wb[B] row weights (0 for padding)."""
        dropout_key = jax.random.fold_in(key, state["step"])

        def loss_fn(params):
            logits = net.apply({"params": params}, xb, train=True, rngs={"dropout": dropout_key})
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, yb)  # [B]
            hits = (jnp.argmax(logits, -1) == yb) * wb
            return jnp.sum(ce * wb) / jnp.sum(wb), jnp.sum(hits) / jnp.sum(wb)

        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"step": state["step"] + 1, "params": params, "opt": opt}, (loss, acc)

    return jax.jit(step_fn, donate_argnums=0, out_shardings=replicated(mesh))


def _initial_state(net: FamiliarityNet, tx, key, mesh: Mesh) -> dict:
    x = jnp.zeros((1, net.config.width), jnp.float32)
    params = jax.jit(net.init)(key, x)["params"]  # one compilation, not one per initialiser op
    state = {"step": np.zeros((), np.int32), "params": params, "opt": tx.init(params)}
    return device_put_global(state, replicated(mesh))


def train_router(
    conditions: np.ndarray,
    config: RouterTrainConfig,
    workdir: str | Path,
    mesh: Mesh | None = None,
    init_params: dict | None = None,
) -> Router:
    """Fits f_mu to seeded random labels of conditions[N, E]; resumes from `workdir`.

    `init_params` (a trained router's, e.g. before edits were appended to `conditions`) replaces
    the random initialisation. Labels are prefix-stable: appended rows keep the earlier labels.
    """
    x = np.asarray(conditions, np.float32)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"conditions must be a non-empty [N, E] array, got shape {x.shape}")
    mesh = make_mesh() if mesh is None else mesh
    net_config = config.network(x.shape[1])
    net = FamiliarityNet(net_config)
    labels = random_labels(len(x), config.n_classes, config.seed)
    batch = min(config.batch_size, len(x))
    rows = padded_rows(batch, mesh)  # padded to split evenly over the data axis
    steps_per_epoch = -(-len(x) // batch)
    total = config.num_epochs * steps_per_epoch
    tx = _optimizer(config.learning_rate, config.weight_decay)
    init_key, key = jax.random.split(jax.random.PRNGKey(config.seed))
    manager = runs.checkpoint_manager(workdir, config.max_to_keep)
    initial = _initial_state(net, tx, init_key, mesh)
    if init_params is not None:
        # A host copy: the jitted step donates its state, which must not be the caller's arrays.
        init_params = jax.tree.map(np.array, init_params)
        initial["params"] = device_put_global(init_params, replicated(mesh))
    state, _ = runs.restore_or(manager, initial)
    log = runs.JsonlLog(Path(workdir) / "metrics.jsonl")

    step_fn = _train_step(net_config, config.learning_rate, config.weight_decay, mesh)
    start = int(state["step"])
    with tqdm(range(start, total), desc="router", initial=start, total=total) as bar:
        for step in bar:
            idx, w = _batch(step, len(x), batch, rows, config.seed)
            state, (loss, acc) = step_fn(state, key, *shard_batch(mesh, (x[idx], labels[idx], w)))
            if (step + 1) % config.log_every == 0 or step + 1 == total:
                loss, acc = float(loss), float(acc)
                bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.3f}")
                log.write(
                    event="train",
                    step=step + 1,
                    epoch=(step + 1) / steps_per_epoch,
                    loss=loss,
                    acc=acc,
                )
            if (step + 1) % config.save_every == 0 or step + 1 == total:
                runs.save(manager, step + 1, state)
    manager.close()
    return Router(net_config, state["params"], config.threshold, mesh, config.batch_size)


def restore_router(
    workdir: str | Path, config: RouterTrainConfig, width: int, mesh: Mesh | None = None
) -> Router:
    """The latest router saved in `workdir` for encoder width `width` (threshold from config)."""
    mesh = make_mesh() if mesh is None else mesh
    net = FamiliarityNet(config.network(width))
    tx = _optimizer(config.learning_rate, config.weight_decay)
    manager = runs.checkpoint_manager(workdir, config.max_to_keep)
    state, found = runs.restore_or(manager, _initial_state(net, tx, jax.random.PRNGKey(0), mesh))
    manager.close()
    if not found:
        raise FileNotFoundError(f"{workdir}: no router checkpoint")
    return Router(net.config, state["params"], config.threshold, mesh, config.batch_size)
