"""The generator's training data: validated (weights, conditions) rows and the batch order.

Axes: N bank rows, P neuron vector length, E condition width, B batch (padded).

Rows whose fit failed (NaN weights, or `success` false) are dropped with a logged count: the
reference trains only on successful edits. A non-finite condition on a kept row is an error
(an encoder bug, not a failed edit), named by its row index.

Memory: the kept rows are the caller's arrays themselves when every row is kept (float32
already), a copy of the kept rows only when some are dropped; training gathers and normalises
one minibatch at a time from them (`diffusion.train`), so a bank of 10,000 x 8,193 values is
held once, not once per processing stage.
"""

import logging
from typing import NamedTuple

import numpy as np

log = logging.getLogger(__name__)


class TrainingBank(NamedTuple):
    """Rows the generator trains on."""

    weights: np.ndarray  # [N, P] float32, raw neuron weights
    conditions: np.ndarray  # [N, E] float32, condition vectors (not yet L2-normalised)
    rows: np.ndarray  # [N] int64, each row's index in the source bank


def prepare_bank(
    weights: np.ndarray,
    conditions: np.ndarray,
    success: np.ndarray | None = None,
    source: str = "bank",
) -> TrainingBank:
    """Checks shapes, drops failed rows (NaN weights or `success` false) and logs how many.

    `source` names the data in error messages (e.g. the bank file's path).
    """
    weights = np.asarray(weights)
    conditions = np.asarray(conditions)
    if weights.ndim != 2:
        raise ValueError(f"{source}: field 'weights' must be [N, P], got shape {weights.shape}")
    if conditions.ndim != 2:
        raise ValueError(
            f"{source}: field 'conditions' must be [N, E], got shape {conditions.shape}"
        )
    if conditions.shape[0] != weights.shape[0]:
        raise ValueError(
            f"{source}: 'weights' has {weights.shape[0]} rows but 'conditions' has "
            f"{conditions.shape[0]}; expected one condition per weight row"
        )
    keep = np.all(np.isfinite(weights), axis=1)
    if success is not None:
        success = np.asarray(success)
        if success.shape != (weights.shape[0],):
            raise ValueError(
                f"{source}: field 'success' must be [{weights.shape[0]}], got {success.shape}"
            )
        keep &= success.astype(bool)
    bad_cond = np.flatnonzero(keep & ~np.all(np.isfinite(conditions), axis=1))
    if bad_cond.size:
        raise ValueError(
            f"{source}: record {int(bad_cond[0])}: field 'conditions' has NaN or inf "
            f"({bad_cond.size} such rows); expected finite condition vectors"
        )
    dropped = int((~keep).sum())
    if dropped:
        log.info(
            "%s: dropped %d of %d rows (failed fit or non-finite weights)",
            source,
            dropped,
            weights.shape[0],
        )
    if not keep.any():
        raise ValueError(f"{source}: no usable rows (all {weights.shape[0]} failed or NaN)")
    rows = np.flatnonzero(keep)
    if keep.all():  # no copy: the caller's arrays (converted only if not float32)
        return TrainingBank(
            weights.astype(np.float32, copy=False), conditions.astype(np.float32, copy=False), rows
        )
    return TrainingBank(
        weights[rows].astype(np.float32, copy=False),
        conditions[rows].astype(np.float32, copy=False),
        rows,
    )


def padded_batch_size(num_rows: int, batch_size: int, data_shards: int) -> int:
    """Rows per step (0 = the whole bank), rounded up to a multiple of the data-axis size."""
    rows = num_rows if batch_size == 0 else min(batch_size, num_rows)
    return -(-rows // data_shards) * data_shards


def batch_rows(
    num_rows: int, batch_size: int, padded: int, step: int, shuffle: bool, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(row indices [B], mask [B]) of training step `step`; B = `padded`.

    Steps walk through the bank in epochs of ceil(N / batch) batches, in order (the reference's
    shuffle=False) or in a per-epoch permutation; the last batch of an epoch may be short and is
    padded with masked copies of row 0. A pure function of `step`, so a resumed run sees exactly
    the batches an uninterrupted one would.
    """
    per_batch = num_rows if batch_size == 0 else min(batch_size, num_rows)
    batches_per_epoch = -(-num_rows // per_batch)
    epoch, index = divmod(step, batches_per_epoch)
    order = np.arange(num_rows)
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(num_rows)
    chosen = order[index * per_batch : (index + 1) * per_batch]
    rows = np.zeros(padded, dtype=np.int32)
    mask = np.zeros(padded, dtype=np.float32)
    rows[: chosen.size] = chosen
    mask[: chosen.size] = 1.0
    return rows, mask
