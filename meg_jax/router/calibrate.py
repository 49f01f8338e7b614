"""Choosing the router threshold epsilon from an ROC curve, without touching the evaluation set.

Axes: M thresholds on the ROC curve.

The gate routes a query to a generated neuron when its entropy H < epsilon. A positive is a
query that should be routed (a paraphrase of an edited fact), a negative one that should not
(an unrelated query). The reference picked epsilon by grid search on the evaluation metrics; to
keep the evaluation paraphrases unseen, calibrate on *pseudo-edits* instead:
  1. add a held-out set of pseudo-edit queries (e.g. from counterfact-train, disjoint from the
     edit set and from the encoder's training pairs) to the router's training queries;
  2. positives: those pseudo-edits' paraphrases; negatives: their locality (neighbourhood)
     prompts, which share the relation but not the fact;
  3. pick epsilon on the resulting ROC: the maximum of Youden's J = TPR - FPR, or the largest
     TPR whose FPR stays within a target.
Then report routing rates on the edit set (prompts, paraphrases, locality prompts) at that
epsilon. The pseudo-edits cost nothing at inference: nobody queries them.
"""

import dataclasses
import io
from typing import Literal

import numpy as np

from meg_jax.infra.files import write_bytes_atomic, write_json_atomic


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    """`rule`: "youden" (max TPR - FPR) or "fpr" (max TPR with FPR <= `target_fpr`)."""

    rule: Literal["youden", "fpr"] = "youden"
    target_fpr: float = 0.05

    def __post_init__(self):
        if self.rule not in ("youden", "fpr"):
            raise ValueError(
                f"calibration.rule: expected one of ('youden', 'fpr'), got {self.rule!r}"
            )
        if not 0.0 <= self.target_fpr <= 1.0:
            raise ValueError(f"calibration.target_fpr: expected [0, 1], got {self.target_fpr!r}")


def _check(name: str, values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, np.float64).ravel()
    if values.size == 0 or not np.all(np.isfinite(values)):
        raise ValueError(f"{name} entropies must be a non-empty array of finite numbers")
    return values


def roc_curve(positive: np.ndarray, negative: np.ndarray):
    """(fpr [M], tpr [M], thresholds [M]) of the gate H < threshold, thresholds ascending.

    Thresholds are the midpoints between consecutive distinct entropies, plus one below all of
    them (nothing routed) and one above (everything routed), so each curve point is reachable.
    """
    pos, neg = _check("positive", positive), _check("negative", negative)
    values = np.unique(np.concatenate([pos, neg]))
    mids = (values[:-1] + values[1:]) / 2
    thresholds = np.concatenate([[values[0] - 1.0], mids, [values[-1] + 1.0]])
    tpr = np.searchsorted(np.sort(pos), thresholds, side="left") / len(pos)
    fpr = np.searchsorted(np.sort(neg), thresholds, side="left") / len(neg)
    return fpr, tpr, thresholds


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(H_pos < H_neg) + P(tie) / 2: the area under the ROC curve (Mann-Whitney form)."""
    pos, neg = _check("positive", positive), _check("negative", negative)
    neg_sorted = np.sort(neg)
    below = np.searchsorted(neg_sorted, pos, side="left")  # negatives strictly below each positive
    ties = np.searchsorted(neg_sorted, pos, side="right") - below
    above = len(neg) - below - ties
    return float(np.sum(above + 0.5 * ties) / (len(pos) * len(neg)))


def choose_threshold(fpr, tpr, thresholds, config: CalibrationConfig) -> int:
    """Index of the operating point on the ROC curve under `config.rule`."""
    if config.rule == "youden":
        return int(np.argmax(tpr - fpr))
    allowed = np.flatnonzero(fpr <= config.target_fpr)  # never empty: the lowest threshold
    return int(allowed[np.argmax(tpr[allowed])])


def calibrate(
    positive: np.ndarray,
    negative: np.ndarray,
    config: CalibrationConfig = CalibrationConfig(),
    report_sets: dict[str, np.ndarray] | None = None,
) -> dict:
    """The calibration report: AUC, chosen threshold and its TPR/FPR, the ROC points, and the
    routed fraction (H < threshold) of every entropy array in `report_sets`."""
    fpr, tpr, thresholds = roc_curve(positive, negative)
    i = choose_threshold(fpr, tpr, thresholds, config)
    threshold = float(thresholds[i])
    report = {
        "auc": roc_auc(positive, negative),
        "rule": config.rule,
        "target_fpr": config.target_fpr if config.rule == "fpr" else None,
        "threshold": threshold,
        "tpr": float(tpr[i]),
        "fpr": float(fpr[i]),
        "youden_j": float(tpr[i] - fpr[i]),
        "n_positive": int(np.size(positive)),
        "n_negative": int(np.size(negative)),
        "routed_fraction": {
            name: float(np.mean(np.asarray(h) < threshold))
            for name, h in (report_sets or {}).items()
        },
        "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "threshold": thresholds.tolist()},
    }
    return report


def plot_roc(report: dict, path, title: str = "Familiarity-network gate") -> None:
    """Writes the ROC curve with the chosen operating point to a PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=120)
    ax.plot(report["roc"]["fpr"], report["roc"]["tpr"], label=f"AUC = {report['auc']:.3f}")
    ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=0.8)
    ax.scatter(
        [report["fpr"]],
        [report["tpr"]],
        color="C3",
        zorder=3,
        label=f"epsilon = {report['threshold']:.3g} ({report['rule']})",
    )
    ax.set_xlabel("false-positive rate (unrelated queries routed)")
    ax.set_ylabel("true-positive rate (paraphrases routed)")
    ax.set_title(title)
    ax.legend(loc="lower right")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())


def write_calibration(report: dict, json_path, png_path=None) -> None:
    """Writes the report as JSON (and the ROC PNG when `png_path` is given), atomically."""
    write_json_atomic(json_path, report)
    if png_path is not None:
        plot_roc(report, png_path)
