"""Stage 2, the router: the Familiarity Network f_mu and its entropy gate.

Public API:
    RouterTrainConfig, train_router(conditions, config, workdir, mesh=None) -> Router
    Router.entropy(conditions) -> [N], Router.route(conditions) -> bool [N]  (H < threshold)
    NearestGate.build(conditions, threshold, mesh): the nearest-query gate (`router.kind`);
    Gate = Router | NearestGate, both with score(conditions) -> [N] and route(conditions)
    restore_router(workdir, config, width, mesh=None) -> Router
    familiarity_entropy(config, params, conditions) -> [B]    the pure jitted core
    CalibrationConfig, calibrate(positive, negative, config, report_sets) -> dict
    roc_curve, roc_auc, plot_roc(report, png), write_calibration(report, json, png)
"""

from meg_jax.router.calibrate import (
    CalibrationConfig,
    calibrate,
    plot_roc,
    roc_auc,
    roc_curve,
    write_calibration,
)
from meg_jax.router.gate import Gate, Router
from meg_jax.router.nearest import NearestGate
from meg_jax.router.network import (
    FamiliarityConfig,
    FamiliarityNet,
    entropy,
    familiarity_entropy,
)
from meg_jax.router.train import RouterTrainConfig, restore_router, train_router

__all__ = [
    "CalibrationConfig",
    "FamiliarityConfig",
    "FamiliarityNet",
    "Gate",
    "NearestGate",
    "Router",
    "RouterTrainConfig",
    "calibrate",
    "entropy",
    "familiarity_entropy",
    "plot_roc",
    "restore_router",
    "roc_auc",
    "roc_curve",
    "train_router",
    "write_calibration",
]
