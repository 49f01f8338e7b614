"""The trained familiarity gate: entropy of a query's [CLS] under f_mu, routed below a threshold.

Axes: N queries, E encoder width.

`Router` is what inference and evaluation use; training (`meg_jax.router.train`) produces one.
"""

import dataclasses

import numpy as np
from jax.sharding import Mesh

from meg_jax.infra.sharding import shard_batch
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
        rows = padded_rows(min(self.batch_size, max(len(x), 1)), self.mesh)
        out = []
        for start in range(0, len(x), rows):
            part = x[np.arange(start, start + rows) % len(x)]  # wrap: one shape, no empty rows
            out.append(
                np.asarray(
                    familiarity_entropy(self.config, self.params, shard_batch(self.mesh, part))
                )
            )
        return np.concatenate(out)[: len(x)] if out else np.zeros((0,), np.float32)

    def route(self, conditions: np.ndarray) -> np.ndarray:
        """bool [N]: entropy below the threshold, i.e. an edited (or paraphrased) query."""
        return self.entropy(conditions) < self.threshold

    def with_threshold(self, threshold: float) -> "Router":
        return dataclasses.replace(self, threshold=float(threshold))


def padded_rows(batch: int, mesh: Mesh) -> int:
    data = mesh.shape["data"]
    return -(-batch // data) * data
