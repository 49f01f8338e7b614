"""The trained familiarity gate: entropy of a query's [CLS] under f_mu, routed below a threshold.

Axes: N queries, E encoder width.

`Router` is what inference and evaluation use; training (`meg_jax.router.train`) produces one.
`save_router` / `load_router` keep it as `router.json` (network shape, threshold) and
`router.msgpack` (parameters): the artefact, apart from the training checkpoints. `load_router`
also reads the other kind of gate, `nearest.NearestGate`; `Gate` is either.
"""

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
from flax import serialization
from jax.sharding import Mesh

from meg_jax.infra.distributed import device_put_global, gather_to_host
from meg_jax.infra.files import write_bytes_atomic, write_json_atomic
from meg_jax.infra.sharding import replicated, shard_batch
from meg_jax.router.nearest import KIND as NEAREST
from meg_jax.router.nearest import NearestGate
from meg_jax.router.network import FamiliarityConfig, familiarity_entropy


@dataclasses.dataclass(frozen=True, eq=False)
class Router:
    """The trained gate: `route(conditions)` is True where a query should get a generated neuron."""

    config: FamiliarityConfig
    params: dict
    threshold: float
    mesh: Mesh
    batch_size: int = 1024

    def entropy(self, conditions: np.ndarray) -> np.ndarray:
        """H [N] for conditions[N, E] (raw-query [CLS] vectors), in fixed-size batches."""
        x = np.asarray(conditions, np.float32)
        if x.ndim != 2 or x.shape[1] != self.config.width:
            raise ValueError(f"conditions of shape {x.shape}; expected [N, {self.config.width}]")
        # Always full batches: a query's entropy (so its routing) is computed by one program,
        # whatever else shares the call.
        rows = padded_rows(self.batch_size, self.mesh)
        out = []
        for start in range(0, len(x), rows):
            part = x[np.arange(start, start + rows) % len(x)]  # wrap: one shape, no empty rows
            entropy = familiarity_entropy(self.config, self.params, shard_batch(self.mesh, part))
            out.append(gather_to_host(entropy))
        return np.concatenate(out)[: len(x)] if out else np.zeros((0,), np.float32)

    def score(self, conditions: np.ndarray) -> np.ndarray:
        """[N] what the threshold is compared with: here the entropy."""
        return self.entropy(conditions)

    def route(self, conditions: np.ndarray) -> np.ndarray:
        """bool [N]: entropy below the threshold, i.e. an edited (or paraphrased) query."""
        return self.entropy(conditions) < self.threshold

    def with_threshold(self, threshold: float) -> "Router":
        return dataclasses.replace(self, threshold=float(threshold))


def padded_rows(batch: int, mesh: Mesh) -> int:
    data = mesh.shape["data"]
    return -(-batch // data) * data


def save_router(router: Router, folder: str | Path) -> None:
    """Writes `router.json` and `router.msgpack` under `folder`, atomically."""
    folder = Path(folder)
    write_bytes_atomic(
        folder / "router.msgpack", serialization.msgpack_serialize(jax.device_get(router.params))
    )
    write_json_atomic(
        folder / "router.json",
        {
            "network": dataclasses.asdict(router.config),
            "threshold": router.threshold,
            "batch_size": router.batch_size,
        },
    )


def load_router(folder: str | Path, mesh: Mesh) -> "Gate":
    """The gate `save_router` (or `NearestGate.save`) wrote, replicated over `mesh`. A
    router.json without a "kind" is a familiarity network's (written before kinds existed)."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / "router.json").read_text(encoding="utf-8"))
        nearest = meta.get("kind", "familiarity") == NEAREST
        if not nearest:
            params = serialization.msgpack_restore((folder / "router.msgpack").read_bytes())
            config = FamiliarityConfig(**meta["network"])
            threshold, batch_size = float(meta["threshold"]), int(meta["batch_size"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(
            f"{folder}: no readable router ({type(err).__name__}: {err}); rerun the router stage "
            "(--config.stage=router)"
        ) from None
    if nearest:
        return NearestGate.load(folder, meta, mesh)
    return Router(config, device_put_global(params, replicated(mesh)), threshold, mesh, batch_size)


# What inference routes with: the familiarity network's entropy or the nearest-query distance.
Gate = Router | NearestGate
