"""The generator's training loop: batches, checkpoints with resume, metrics and early stopping.

Axes: N bank rows, P neuron vector length, E condition width, B batch.

A run lives in `workdir`:
    checkpoints/<step>/      orbax checkpoints of the whole `TrainState` (resume point)
    metrics.jsonl            one JSON object per log or evaluation event
    generator.json           the config and shapes, so `load_generator` can rebuild the state

Every `train.eval_every` steps the reference's stopping criterion is evaluated: weights are
sampled for all training conditions (with `train.criterion_sampler`; the reference uses the
full-T ancestral sampler from one shared noise vector), their per-item L2 distance to the
targets is taken in RAW weight space, and training stops once mean + std (unbiased, as
torch.std) falls below `train.stop_threshold`. A callback sees each evaluation (e.g. to measure
the LLM's edit success with the sampled weights) and may return extra metrics to log; a returned
`"halt": True` ends training there (e.g. a wall-clock budget), with a checkpoint.

Before the first step the L2 floor that the DiT's head sets under this bank is logged with the
`start` event (`head_floor`, mean + std; `capacity.py`), with a warning when it is not below the
stopping threshold: a head narrower than its patch cannot emit part of the bank, however long
it trains.

Zero-weight augmentation (MeG's "DA", METHOD.md §4.4, Table 15): `zero_conditions` [M, E] are
conditions of queries that must get the all-zero neuron (the unedited model). They are appended
after the bank rows, each with the target x0 = normalize(0), i.e. exactly the zero neuron once
sampling inverts the map. The normalisation (weight centre and scale, condition centre) is fitted
on the bank rows ONLY: it describes fitted neurons, and M zero rows would otherwise pull the
centre towards zero and shrink the scale by a factor that depends on M. The stopping criterion is
taken over every training row, zero rows included (their L2 is the norm of their samples), so
training cannot stop while the zero targets are still unlearned; the bank rows' own value
(`bank_criterion`, what a run without DA stops on) and the zero rows' mean and largest L2
(`zero_l2_mean`, `zero_l2_max`) are logged beside it. (The reference's check reads whichever batch
its loader yielded last, with DA a batch of zero rows: no rule worth copying.)

Divergence is never silent: at every log step, before every checkpoint and at every criterion
evaluation the loss, the whole train state and the criterion must be finite. When one is not,
training stops, the non-finite state is NOT saved (so the newest checkpoint stays the last finite
one), a `non_finite` event is logged and `NonFiniteTrainingError` names the step, what was not
finite and the last finite checkpoint. A NaN criterion can therefore never pass (or fail) the
stopping comparison unnoticed.
"""

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from meg_jax.diffusion.bank import batch_rows, padded_batch_size, prepare_bank
from meg_jax.diffusion.capacity import head_floor
from meg_jax.diffusion.config import GeneratorConfig
from meg_jax.diffusion.generate import GeneratorParams, as_generator_params, generate
from meg_jax.diffusion.normalization import (
    NormStats,
    center_conditions,
    fit_normalization,
    normalize,
)
from meg_jax.diffusion.train_step import TrainState, init_state, make_train_step
from meg_jax.infra.config import dataclass_from_dict
from meg_jax.infra.distributed import device_put_global
from meg_jax.infra.files import write_json_atomic
from meg_jax.infra.runs import JsonlLog, checkpoint_manager, restore_or, save
from meg_jax.infra.sharding import make_mesh, replicated, shard_batch

log = logging.getLogger(__name__)

# (step, state, raw samples [N, P], criterion record) -> extra metrics to log, or None.
EvalCallback = Callable[[int, TrainState, np.ndarray, dict], dict | None]


class TrainResult(NamedTuple):
    """The final state and how training ended."""

    state: TrainState
    step: int  # steps done
    stopped: bool  # True when the criterion fell below the threshold
    criterion: float | None  # the last evaluated mean + std (None if never evaluated)
    evaluations: list[dict]  # every criterion record of this call


class NonFiniteTrainingError(FloatingPointError):
    """Generator training produced NaN/inf; the message names the step and the last finite
    checkpoint, which is left as the newest on disk."""


@jax.jit
def _all_finite(tree) -> jax.Array:
    """[] bool: every floating leaf of `tree` is free of NaN and inf (one fused reduction)."""
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _state_finite(state: TrainState) -> bool:
    return bool(_all_finite((state.params, state.ema_params, state.opt_state)))


def row_l2(samples: np.ndarray, targets: np.ndarray | None = None, chunk: int = 1024) -> np.ndarray:
    """[N] float64 raw-space L2 distance of each sample row [N, P] to its target row (to 0 when
    `targets` is None), `chunk` rows at a time: no float64 copy of a whole bank is made."""
    out = np.empty(len(samples), np.float64)
    for start in range(0, len(samples), chunk):
        diff = np.asarray(samples[start : start + chunk], np.float64)
        if targets is not None:
            diff -= np.asarray(targets[start : start + chunk], np.float64)
        out[start : start + chunk] = np.linalg.norm(diff, axis=1)
    return out


def l2_summary(l2: np.ndarray) -> dict:
    """Mean, unbiased std (as torch.std) and mean + std (the stop value) of per-item L2 [N]."""
    std = float(l2.std(ddof=1)) if l2.size > 1 else 0.0
    return {"l2_mean": float(l2.mean()), "l2_std": std, "criterion": float(l2.mean()) + std}


def l2_criterion(samples: np.ndarray, targets: np.ndarray) -> dict:
    """Per-item raw-space L2 [N] and its mean, unbiased std and mean + std (the stop value)."""
    return l2_summary(row_l2(samples, targets))


def _rngs(seed: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    root = jax.random.key(seed)
    return tuple(jax.random.fold_in(root, i) for i in range(3))  # init, train, eval


def train_generator(
    weights: np.ndarray,
    conditions: np.ndarray,
    config: GeneratorConfig,
    workdir: str | Path,
    *,
    success: np.ndarray | None = None,
    init: np.ndarray | None = None,
    mesh: Mesh | None = None,
    callback: EvalCallback | None = None,
    source: str = "bank",
    warm_start: GeneratorParams | None = None,
    zero_conditions: np.ndarray | None = None,
) -> TrainResult:
    """Trains (or resumes) the generator on `weights` [N, P] given `conditions` [N, E].

    Rows with NaN weights or `success` false are dropped (logged). `init` [P] is the shared
    initial neuron, needed only for normalization.center = "init". `mesh` defaults to all local
    devices on the "data" axis; the batch is split over it and the state replicated.
    `warm_start` (a trained generator, e.g. before edits were added) starts the network from its
    sampling weights and keeps its weight map, so what it learned stays valid on the new bank.
    `zero_conditions` [M, E] (zero-weight augmentation, module docstring) are trained towards
    the all-zero neuron; the normalisation is fitted without them.
    """
    bank = prepare_bank(weights, conditions, success, source)
    zeros = _zero_conditions(zero_conditions, bank.conditions.shape[1], source)
    workdir = Path(workdir)
    mesh = mesh or make_mesh()
    tcfg = config.train
    init_rng, train_rng, eval_rng = _rngs(tcfg.seed)

    if warm_start is None:
        norm = fit_normalization(config.normalization, bank.weights, bank.conditions, init)
    else:
        norm = NormStats(*(jnp.asarray(x, jnp.float32) for x in warm_start.norm))
    length, width = bank.weights.shape[1], bank.conditions.shape[1]
    # Training rows: the bank, then the zero rows (target: the zero neuron in RAW space). Each
    # minibatch is gathered from the one bank array and normalised on its own (`_minibatch`):
    # no normalised copy of the whole bank is ever made.
    num_rows = len(bank.weights) + len(zeros)
    write_json_atomic(
        workdir / "generator.json",
        {"config": dataclasses.asdict(config), "length": length, "cond_width": width},
    )

    manager = checkpoint_manager(workdir, tcfg.max_to_keep)
    initial = init_state(config, norm, width, init_rng, mesh)
    if warm_start is not None:
        weights = device_put_global(warm_start.params, replicated(mesh))
        # Its own buffers: the train step donates params and EMA separately.
        ema = jax.tree.map(jnp.copy, weights) if initial.ema_params is not None else None
        initial = initial.replace(params=weights, ema_params=ema)
    state, resumed = restore_or(manager, initial)
    start = int(state.step)
    if resumed:
        _check_same_bank(state.norm, norm, workdir)
        log.info("resumed %s at step %d", workdir, start)
        if not _state_finite(state):
            raise NonFiniteTrainingError(
                f"{workdir}: the checkpoint at step {start} holds NaN or inf parameters (saved by "
                "a run that diverged); delete the workdir and train again with a lower "
                "optim.learning_rate or optim.grad_clip set"
            )
    metrics_log = JsonlLog(workdir / "metrics.jsonl")
    floor = _warn_head_floor(config, norm, bank.weights, workdir)
    metrics_log.write(
        event="start",
        step=start,
        rows=len(bank.rows),
        zero_rows=len(zeros),
        resumed=resumed,
        head_floor=floor,
    )

    step_fn = make_train_step(config, mesh)
    padded = padded_batch_size(num_rows, tcfg.batch_size, mesh.shape["data"])
    evaluations: list[dict] = []
    criterion, stopped, halted = None, False, False
    postfix: dict[str, str] = {}
    began = time.perf_counter()
    bar = tqdm(range(start, tcfg.num_steps), initial=start, total=tcfg.num_steps, desc="generator")

    def stop_non_finite(done: int, what: str):
        bar.close()
        last = manager.latest_step()
        metrics_log.write(event="non_finite", step=done, what=what, last_finite_step=last)
        kept = (
            f"the last finite checkpoint is step {last} in {manager.directory}"
            if last is not None
            else "no checkpoint was saved before it"
        )
        raise NonFiniteTrainingError(
            f"{workdir}: generator training diverged at step {done} ({what}); training stopped "
            f"and this state was not saved; {kept}. Lower optim.learning_rate, set "
            "optim.grad_clip or add optim.warmup_steps, then train again in a fresh workdir (a "
            "rerun with the same settings resumes from that checkpoint and diverges again)"
        )

    finite_at = -1  # the last step whose whole state was checked finite
    for step in bar:
        rows, mask = batch_rows(num_rows, tcfg.batch_size, padded, step, tcfg.shuffle, tcfg.seed)
        x0, cond = _minibatch(bank, zeros, norm, rows)
        # Placed first: jit refuses host arrays for a split input when the mesh spans processes.
        x0, cond, mask = shard_batch(mesh, (x0, cond, mask))
        state, metrics = step_fn(state, x0, cond, mask, train_rng)
        done = step + 1
        if done % tcfg.log_every == 0 or done == tcfg.num_steps:
            record = {k: float(v) for k, v in jax.device_get(metrics).items()}
            metrics_log.write(
                event="train", step=done, wall_s=time.perf_counter() - began, **record
            )
            if not math.isfinite(record["loss"]):
                stop_non_finite(done, f"loss {record['loss']}")
            if not _state_finite(state):
                stop_non_finite(done, "parameters or optimiser state hold NaN or inf")
            finite_at = done
            postfix["loss"] = f"{record['loss']:.4f}"
            bar.set_postfix(postfix)
        if done % tcfg.eval_every == 0 or done == tcfg.num_steps:
            record = _evaluate(state, bank, zeros, config, eval_rng, done, mesh, callback)
            halted = bool(record.pop("halt", False))
            record["wall_s"] = time.perf_counter() - began
            metrics_log.write(event="criterion", step=done, **record)
            evaluations.append(record)
            criterion = record["criterion"]
            if not math.isfinite(criterion):
                # NaN < threshold is False: without this the run would go on training on NaN.
                stop_non_finite(done, f"stopping criterion {criterion} (non-finite samples)")
            postfix["criterion"] = f"{criterion:.4f}"
            bar.set_postfix(postfix)
            log.info("step %d: criterion %.4f (%s)", done, criterion, record["sampler"])
            stopped = criterion < tcfg.stop_threshold
        if done % tcfg.checkpoint_every == 0 or stopped or halted or done == tcfg.num_steps:
            if finite_at != done and not _state_finite(state):
                stop_non_finite(done, "parameters or optimiser state hold NaN or inf")
            save(manager, done, state)
        if stopped or halted:
            break
    bar.close()
    return TrainResult(state, int(state.step), stopped, criterion, evaluations)


def _warn_head_floor(config: GeneratorConfig, norm: NormStats, weights, workdir) -> float:
    """The mean + std of the per-item L2 floor the DiT head sets under this bank
    (`capacity.head_floor`; 0 when patch_size <= hidden), with a warning when it is not below
    the stopping threshold: such a run cannot stop, however long it trains."""
    dit, threshold = config.dit, config.train.stop_threshold
    floor = l2_summary(head_floor(norm, weights, dit.patch_size, dit.hidden))["criterion"]
    if floor >= threshold:
        log.warning(
            "%s: the DiT head emits at most %d directions per patch of %d values; this bank "
            "lies partly outside them, an L2 floor of %.3f (mean + std) that no training "
            "removes, at or above the stopping threshold %.3f: set dit.patch_size <= dit.hidden",
            workdir,
            dit.hidden,
            dit.patch_size,
            floor,
            threshold,
        )
    return floor


def _evaluate(state, bank, zeros, config, eval_rng, step, mesh, callback) -> dict[str, Any]:
    sampler = config.train.criterion_sampler
    began = time.perf_counter()
    conditions = np.concatenate([bank.conditions, zeros])  # one sampling call for both
    samples = generate(state, conditions, jax.random.fold_in(eval_rng, step), config, sampler, mesh)
    samples = np.asarray(jax.device_get(samples))
    n = len(bank.weights)
    # Zero rows' target is the zero neuron: their L2 is the norm of their sample.
    l2 = np.concatenate([row_l2(samples[:n], bank.weights), row_l2(samples[n:])])
    record = {**l2_summary(l2), "sampler": sampler.describe()}
    samples = samples[:n]
    if len(zeros):
        record["bank_criterion"] = l2_summary(l2[:n])["criterion"]
        norms = l2[n:]
        record.update(zero_l2_mean=float(norms.mean()), zero_l2_max=float(norms.max()))
    record["sample_s"] = time.perf_counter() - began
    if callback is not None:
        record.update(callback(step, state, samples, dict(record)) or {})
    return record


def _minibatch(bank, zeros, norm: NormStats, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x0 [B, P], centred conditions [B, E]) of training rows `rows` (bank rows, then the zero
    rows): B rows gathered from the bank and normalised here, the same values as normalising the
    whole bank first (the map is elementwise), without holding that second copy."""
    n = len(bank.weights)
    in_bank = rows < n
    raw = np.zeros((len(rows), bank.weights.shape[1]), np.float32)
    raw[in_bank] = bank.weights[rows[in_bank]]
    cond = np.empty((len(rows), bank.conditions.shape[1]), np.float32)
    cond[in_bank] = bank.conditions[rows[in_bank]]
    cond[~in_bank] = zeros[rows[~in_bank] - n]
    x0 = np.asarray(normalize(norm, raw), np.float32)
    return x0, np.asarray(center_conditions(norm, cond), np.float32)


def _zero_conditions(zero_conditions, width: int, source: str) -> np.ndarray:
    """The zero-target conditions as float32 [M, E] (M = 0 when None), checked."""
    if zero_conditions is None:
        return np.zeros((0, width), np.float32)
    zeros = np.asarray(zero_conditions, np.float32)
    if zeros.ndim != 2 or zeros.shape[1] != width:
        raise ValueError(
            f"{source}: 'zero_conditions' must be [M, {width}] (the bank's condition width), "
            f"got shape {zeros.shape}"
        )
    bad = np.flatnonzero(~np.all(np.isfinite(zeros), axis=1))
    if bad.size:
        raise ValueError(
            f"{source}: zero-augmentation row {int(bad[0])}: 'zero_conditions' has NaN or inf "
            f"({bad.size} such rows); expected finite condition vectors"
        )
    return zeros


def _check_same_bank(saved: NormStats, fitted: NormStats, workdir: Path) -> None:
    # The statistics are a fingerprint of the bank: resuming on other data would be silently wrong.
    for name, a, b in zip(NormStats._fields, saved, fitted, strict=True):
        if a.shape != b.shape or not np.allclose(np.asarray(a), np.asarray(b), rtol=1e-5):
            raise ValueError(
                f"{workdir}: the checkpoint's normalisation {name} differs from this bank's; "
                "it was trained on other data (use a fresh workdir)"
            )


def load_generator(workdir: str | Path) -> tuple[GeneratorParams, GeneratorConfig]:
    """The latest checkpoint of a run as (sampling parameters, config), for `generate`."""
    workdir = Path(workdir)
    meta_path = workdir / "generator.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: no generator run here (missing generator.json)")
    meta = json.loads(meta_path.read_text())
    config = dataclass_from_dict(GeneratorConfig, meta["config"], str(meta_path))
    length, width = int(meta["length"]), int(meta["cond_width"])
    blank = NormStats(jnp.zeros(length), jnp.ones(length), jnp.zeros(width))
    local = make_mesh(1, 1, jax.local_devices()[:1])  # every process restores a whole copy
    target = init_state(config, blank, width, jax.random.key(0), local)
    state, found = restore_or(checkpoint_manager(workdir, config.train.max_to_keep), target)
    if not found:
        raise FileNotFoundError(f"{workdir}/checkpoints: no checkpoint to load")
    return as_generator_params(state), config
