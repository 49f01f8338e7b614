"""The weight bank: one fitted neuron per edit, the training set of the generator.

Axes: N edits, P flat neuron length (2D, or 2D+1 with the input bias).

The on-disk layout (`bank.npz`) is the one of the shared SmolLM2 bank in ../shared/data/banks:
`case_id [N]`, `weights [N, P]` (NaN rows where a fit failed), `success [N]`, `final_loss [N]`
and `init [P]` (the shared initial neuron every fit started from).
"""

import dataclasses
import zipfile
import zlib
from pathlib import Path

import numpy as np

from meg_jax.infra.files import write_npz_atomic

_FIELDS = ("case_id", "weights", "success", "final_loss", "init")


class BankError(ValueError):
    """A bank file that cannot be used: unreadable, incomplete or holding non-finite fits."""


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
    write_npz_atomic(path, **{name: getattr(bank, name) for name in _FIELDS})


def load_bank(path) -> WeightBank:
    """Reads a bank written by `save_bank` (or the shared reference bank).

    A damaged file (truncated zip, corrupt member), a missing field or a successful row with a
    non-finite weight is a `ValueError` naming the file (and the rows) and the way out.
    """
    path = Path(path)
    remedy = "delete it and rerun the collection stage, or restore an intact copy"
    try:
        with np.load(path) as data:
            # Members are decompressed lazily: read them all here, inside the error handling.
            arrays = {name: data[name] for name in data.files}
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise BankError(
            f"{path}: not a readable weight bank ({type(err).__name__}: {err}); {remedy}"
        ) from err
    missing = [f for f in _FIELDS if f not in arrays]
    if missing:
        raise BankError(
            f"{path}: weight bank lacks field(s) {missing}; has {sorted(arrays)}; {remedy}"
        )
    bank = WeightBank(
        arrays["case_id"].astype(np.int64),
        arrays["weights"].astype(np.float32, copy=False),  # no second copy of the bank
        arrays["success"].astype(bool),
        arrays["final_loss"].astype(np.float32),
        arrays["init"].astype(np.float32),
    )
    check_finite(bank, path)
    return bank


def check_finite(bank: WeightBank, where) -> None:
    """Every row marked successful, and the shared `init`, must be finite.

    Failed fits are stored as NaN rows on purpose; a NaN row flagged successful is a corrupt
    bank (or a diverged fit recorded as a success) and would poison the generator's targets.
    """
    bad = bank.success & ~np.isfinite(bank.weights).all(axis=1)
    if bad.any():
        ids = bank.case_id[bad].tolist()
        shown = ", ".join(str(i) for i in ids[:10]) + (" ..." if len(ids) > 10 else "")
        raise BankError(
            f"{where}: {len(ids)} weight-bank row(s) marked successful hold NaN or inf "
            f"(case ids {shown}); the bank is damaged: delete it and rerun the collection stage"
        )
    if not np.isfinite(bank.init).all():
        raise BankError(
            f"{where}: the bank's shared initial neuron 'init' holds NaN or inf; the bank is "
            "damaged: delete it and rerun the collection stage"
        )
