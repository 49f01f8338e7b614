"""Host-side (numpy) numerics shared by the stages' readings."""

import numpy as np


def log_softmax_at(logits: np.ndarray, columns) -> np.ndarray:
    """float64 [R]: log softmax of each row of logits[R, C], read at that row's `columns[r]`.

    The row maximum is subtracted before exponentiating, so large logits cannot overflow.
    """
    rows = np.asarray(logits, np.float64)
    peak = rows.max(axis=-1, keepdims=True)
    log_norm = peak[:, 0] + np.log(np.exp(rows - peak).sum(axis=-1))
    return rows[np.arange(len(rows)), np.asarray(columns)] - log_norm
