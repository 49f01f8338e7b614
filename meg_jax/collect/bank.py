"""The weight bank: one fitted neuron per edit, the training set of the generator.

Axes: N edits, P flat neuron length (2D, or 2D+1 with the input bias).

The on-disk layout (`bank.npz`) is the one of the shared SmolLM2 bank in ../shared/data/banks:
`case_id [N]`, `weights [N, P]` (NaN rows where a fit failed), `success [N]`, `final_loss [N]`
and `init [P]` (the shared initial neuron every fit started from).
"""

import dataclasses
import io
from pathlib import Path

import numpy as np

from meg_jax.infra.files import write_bytes_atomic

_FIELDS = ("case_id", "weights", "success", "final_loss", "init")


@dataclasses.dataclass
class WeightBank:
    """Fitted neurons and their bookkeeping; `weights` rows of failed fits are NaN."""

    case_id: np.ndarray  # [N] int64
    weights: np.ndarray  # [N, P] float32
    success: np.ndarray  # [N] bool
    final_loss: np.ndarray  # [N] float32
    init: np.ndarray  # [P] float32

    def __post_init__(self):
        n = len(self.case_id)
        for name in ("weights", "success", "final_loss"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"bank field {name} has {len(getattr(self, name))} rows, not {n}")
        if self.weights.ndim != 2 or self.weights.shape[1] != self.init.shape[0]:
            raise ValueError(
                f"bank weights {self.weights.shape} do not match init {self.init.shape}"
            )

    def __len__(self) -> int:
        return len(self.case_id)

    @property
    def fitted(self) -> np.ndarray:
        """[N] bool: rows usable as generator targets (successful and finite)."""
        return self.success & np.isfinite(self.weights).all(axis=1)

    def select(self, rows: np.ndarray) -> "WeightBank":
        return WeightBank(
            self.case_id[rows],
            self.weights[rows],
            self.success[rows],
            self.final_loss[rows],
            self.init,
        )

    @staticmethod
    def concatenate(parts: list["WeightBank"]) -> "WeightBank":
        return WeightBank(
            *(np.concatenate([getattr(p, f) for p in parts]) for f in _FIELDS[:-1]),
            parts[0].init,
        )


def save_bank(bank: WeightBank, path) -> None:
    """Writes `bank` to `path` (.npz) atomically: a crash never leaves a half-written bank."""
    buffer = io.BytesIO()
    np.savez(buffer, **{name: getattr(bank, name) for name in _FIELDS})
    write_bytes_atomic(path, buffer.getvalue())


def load_bank(path) -> WeightBank:
    """Reads a bank written by `save_bank` (or the shared reference bank); names missing fields."""
    path = Path(path)
    try:
        data = np.load(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable weight bank ({err})") from err
    missing = [f for f in _FIELDS if f not in data.files]
    if missing:
        raise ValueError(f"{path}: weight bank lacks field(s) {missing}; has {data.files}")
    return WeightBank(
        data["case_id"].astype(np.int64),
        data["weights"].astype(np.float32),
        data["success"].astype(bool),
        data["final_loss"].astype(np.float32),
        data["init"].astype(np.float32),
    )
