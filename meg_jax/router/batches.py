"""Per-query gate scores in fixed-size batches, shared by both kinds of gate.

Axes: N queries, E encoder width, B rows of one batch (padded to split over the mesh's data axis).
"""

from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import Mesh

from meg_jax.infra.distributed import gather_to_host
from meg_jax.infra.sharding import shard_batch


def padded_rows(batch: int, mesh: Mesh) -> int:
    """`batch` rounded up to a multiple of the mesh's data axis."""
    data = mesh.shape["data"]
    return -(-batch // data) * data


def scores_in_full_batches(
    score_batch: Callable[[jax.Array], jax.Array],
    conditions: np.ndarray,
    width: int,
    batch_size: int,
    mesh: Mesh,
) -> np.ndarray:
    """[N] `score_batch` ([B, E] sharded -> [B]) of conditions [N, E], always in full batches:
    a query's score (so its routing) is computed by one program, whatever else shares the call."""
    x = np.asarray(conditions, np.float32)
    if x.ndim != 2 or x.shape[1] != width:
        raise ValueError(f"conditions of shape {x.shape}; expected [N, {width}]")
    rows = padded_rows(batch_size, mesh)
    out = []
    for start in range(0, len(x), rows):
        part = x[np.arange(start, start + rows) % len(x)]  # wrap: one shape, no empty rows
        out.append(gather_to_host(score_batch(shard_batch(mesh, part))))
    return np.concatenate(out)[: len(x)] if out else np.zeros((0,), np.float32)
