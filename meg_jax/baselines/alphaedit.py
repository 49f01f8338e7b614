"""AlphaEdit (Fang et al. 2025): MEMIT's update projected onto the null space of old knowledge.

Axes: E edits, D model width, F MLP width.

With the key moment C_l [F, F] of a layer (the same statistics as MEMIT), P_l projects onto the
span of C_l's eigenvectors whose eigenvalue is below `nullspace_threshold`: directions ordinary
text hardly excites, so an update whose rows live there leaves the layer's output on old keys
(nearly) unchanged. The layer update solves, with the keys K_p of the edits made before
(sequential editing; empty for one batch),

    delta_l = (P_l (K^T K + K_p^T K_p) + l2 I)^-1 P_l K^T R                       [F, D]

and after each batch K_p^T K_p += K^T K with the keys recomputed on the edited model. Targets,
layers and the residual spread are MEMIT's (`memit.apply_updates`).
"""

import dataclasses

import numpy as np

from meg_jax.baselines.edited_host import EditRows, mean_keys
from meg_jax.baselines.memit import MemitConfig, apply_updates


@dataclasses.dataclass(frozen=True)
class AlphaEditConfig:
    nullspace_threshold: float = 2e-2
    l2: float = 10.0
    batch_size: int = 0  # sequential batches of this many edits (0: one batch of all)


def null_space_projector(moment: np.ndarray, threshold: float) -> np.ndarray:
    """P [F, F] onto the eigenvectors of the symmetric moment [F, F] with eigenvalue < threshold
    (AlphaEdit takes the SVD of the covariance; for a PSD matrix it is this eigendecomposition)."""
    values, vectors = np.linalg.eigh(moment)
    small = vectors[:, values < threshold]
    return small @ small.T


def alphaedit_delta(keys, resid, projector, cache, l2: float) -> np.ndarray:
    """The layer update [F, D] of the module docstring (float64)."""
    f = projector.shape[0]
    lhs = projector @ (keys.T @ keys + cache) + l2 * np.eye(f)
    return np.linalg.solve(lhs, projector @ keys.T @ resid)


def alphaedit(
    config,
    params,
    rows: EditRows,
    bare: EditRows,
    zs: np.ndarray,
    projectors: dict[int, np.ndarray],
    caches: dict[int, np.ndarray],
    memit_cfg: MemitConfig,
    cfg: AlphaEditConfig,
):
    """One AlphaEdit batch: (edited params, caches with this batch's keys added, info)."""
    layers = tuple(sorted(memit_cfg.layers))

    def solve(i, keys, resid):
        layer = layers[i]
        return alphaedit_delta(keys, resid, projectors[layer], caches[layer], cfg.l2)

    params, info = apply_updates(config, params, rows, bare, zs, layers, solve)
    caches = dict(caches)
    for layer in layers:
        keys = mean_keys(config, params, rows, layer, len(zs))
        caches[layer] = caches[layer] + keys.T @ keys
    return params, caches, info
