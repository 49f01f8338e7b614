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

from meg_jax.infra.distributed import device_put_global
from meg_jax.infra.files import write_bytes_atomic, write_json_atomic
from meg_jax.infra.sharding import replicated
from meg_jax.router.batches import scores_in_full_batches
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
        return scores_in_full_batches(
            lambda part: familiarity_entropy(self.config, self.params, part),
            conditions,
            self.config.width,
            self.batch_size,
            self.mesh,
        )

    def score(self, conditions: np.ndarray) -> np.ndarray:
        """[N] what the threshold is compared with: here the entropy."""
        return self.entropy(conditions)

    def route(self, conditions: np.ndarray) -> np.ndarray:
        """bool [N]: entropy below the threshold, i.e. an edited (or paraphrased) query."""
        return self.entropy(conditions) < self.threshold

    def with_threshold(self, threshold: float) -> "Router":
        return dataclasses.replace(self, threshold=float(threshold))


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
