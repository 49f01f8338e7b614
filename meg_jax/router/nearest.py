"""The nearest-query gate: a query is routed when its [CLS] is close to a memorised query's.

Axes: N queries, M memorised queries, E encoder width.

An alternative to the familiarity network (`gate.Router`, MeG's entropy gate), chosen with
`router.kind = "nearest"`. The gate memorises the same queries the familiarity network is
trained on (the edits' and the calibration pseudo-edits' raw-query [CLS]); a query's score is
its cosine distance to the nearest of them, and it is routed below the threshold, which is
calibrated on the pseudo-edits exactly like the entropy's (`calibrate.py`). Nothing is trained:
adding edits appends rows, and the gate then equals one built on the union from scratch.

Why: with the main job's tuned MiniLM, paraphrases lie much closer to their own edit's query
than neighbourhood prompts lie to any edit's. In the main job with `:ctx=2` it routes 93.8% of
the CounterFact-256 paraphrases and 2.7% of the neighbourhood prompts, where the entropy gate
routes 80.5% and 21.5%, and the Score goes from 73.4 to 80.6 (bench/results/quality_seed0_top1.json,
default_ctx2.json; README "Router kinds").
"""

import dataclasses
import io
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from meg_jax.infra.distributed import device_put_global, gather_to_host
from meg_jax.infra.files import write_bytes_atomic, write_json_atomic
from meg_jax.infra.sharding import replicated
from meg_jax.router.batches import scores_in_full_batches

KIND = "nearest"
MEMORY_FILE = "nearest.npy"


def unit_rows(x: np.ndarray, source: str) -> np.ndarray:
    """float32 [N, E] rows scaled to unit length; a zero or non-finite row is a named error."""
    x = np.asarray(x, np.float32)
    if x.ndim != 2:
        raise ValueError(f"{source}: expected [N, E] condition vectors, got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    bad = np.flatnonzero(~np.isfinite(norms[:, 0]) | (norms[:, 0] == 0))
    if bad.size:
        raise ValueError(
            f"{source}: row {int(bad[0])} is zero or not finite ({bad.size} such rows); a "
            "condition vector must have a direction"
        )
    return x / norms


@jax.jit
def nearest_distance(memory: jnp.ndarray, queries: jnp.ndarray) -> jnp.ndarray:
    """[B] cosine distance (1 - cos) of each query [B, E] to its nearest unit row of memory
    [M, E]; queries need not be unit length (a zero query gets distance 1)."""
    norms = jnp.maximum(jnp.linalg.norm(queries, axis=-1, keepdims=True), 1e-12)
    similarity = (queries / norms) @ memory.T  # [B, M]
    return 1.0 - jnp.max(similarity, axis=-1)


@dataclasses.dataclass(frozen=True, eq=False)
class NearestGate:
    """`route(conditions)` is True where a query lies within `threshold` (cosine distance) of a
    memorised query. `memory` [M, E]: unit rows, replicated over `mesh`."""

    memory: jax.Array
    threshold: float
    mesh: Mesh
    batch_size: int = 1024

    @classmethod
    def build(
        cls, conditions: np.ndarray, threshold: float, mesh: Mesh, batch_size: int = 1024
    ) -> "NearestGate":
        memory = unit_rows(conditions, "nearest gate: memorised conditions")
        return cls(device_put_global(memory, replicated(mesh)), float(threshold), mesh, batch_size)

    def score(self, conditions: np.ndarray) -> np.ndarray:
        """[N] distance to the nearest memorised query, for conditions [N, E] (raw-query [CLS])."""
        return scores_in_full_batches(
            lambda part: nearest_distance(self.memory, part),
            conditions,
            self.memory.shape[1],
            self.batch_size,
            self.mesh,
        )

    def route(self, conditions: np.ndarray) -> np.ndarray:
        """bool [N]: closer than the threshold to a memorised query."""
        return self.score(conditions) < self.threshold

    def with_threshold(self, threshold: float) -> "NearestGate":
        return dataclasses.replace(self, threshold=float(threshold))

    def save(self, folder: str | Path) -> None:
        """`router.json` (kind, threshold) and the memory as `nearest.npy`, atomically."""
        folder = Path(folder)
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(gather_to_host(self.memory), np.float32))
        write_bytes_atomic(folder / MEMORY_FILE, buffer.getvalue())
        write_json_atomic(
            folder / "router.json",
            {"kind": KIND, "threshold": self.threshold, "batch_size": self.batch_size},
        )

    @classmethod
    def load(cls, folder: str | Path, meta: dict, mesh: Mesh) -> "NearestGate":
        """The gate `save` wrote, `meta` being its parsed router.json."""
        path = Path(folder) / MEMORY_FILE
        try:
            memory = np.asarray(np.load(path, allow_pickle=False), np.float32)
            threshold, batch_size = float(meta["threshold"]), int(meta["batch_size"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(
                f"{path}: no readable nearest-query gate ({type(err).__name__}: {err}); rerun "
                "the router stage (--config.stage=router)"
            ) from None
        # Used as saved (dividing by norms of ~1 again would move the scores by rounding).
        if memory.ndim != 2 or not np.allclose(np.linalg.norm(memory, axis=1), 1.0, atol=1e-4):
            raise ValueError(f"{path}: expected [M, E] unit-length rows, as the gate saves them")
        return cls(device_put_global(memory, replicated(mesh)), threshold, mesh, batch_size)
