"""MeG's metrics (protocol P5), model-agnostic: AG string matching and the Score.

Reliability, Generality and Locality are each read two ways (METHOD.md §1.3):
  - AG (prefix-autoregressive generation): the greedy continuation, cut and stripped as here,
    compared as a string. This module.
  - TF (teacher forcing): token top-1 accuracy. `meg_jax.evaluation.teacher_forcing`.
Score is the harmonic mean of the six percentages.

Nothing here runs a model. A model enters through `LogitsFn` (token ids -> logits), so the batched
evaluator (and tests) can plug in anything. How an answer is read (cuts, post-processing,
matching) lives with the prompt templates, in `meg_jax.data.answers`.

Axes: B batch, T tokens, V vocabulary.

Loc AG is correct iff the processed prediction equals, case-sensitively, the stored pre-edit
answer, which is the unedited model's continuation processed by the same function
(`meg_jax.data.preprocess`); Rel/Gen AG by `meg_jax.data.answers.answer_matches`.
"""

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from meg_jax.data.answers import (
    MatchRule,
    answer_matches,
    postprocess_answer,
    postprocess_locality_answer,
)


class LogitsFn(Protocol):
    """One forward pass: `input_ids` [B, T] int32 and `attention_mask` [B, T] (1 = real token,
    right-padded) -> logits [B, T, V]. Only positions under the mask are read."""

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray: ...


def answer_ag_correct(
    continuations: Sequence[str],
    targets: Sequence[str],
    cuts: Sequence[str],
    rule: MatchRule = "exact",
) -> list[bool]:
    """Rel/Gen AG: one flag per raw continuation, against its target."""
    _check_same_length(continuations, targets, "continuations", "targets")
    return [
        answer_matches(postprocess_answer(c, cuts), t, rule)
        for c, t in zip(continuations, targets, strict=True)
    ]


def locality_ag_correct(
    continuations: Sequence[str], pre_edit_answers: Sequence[str], cuts: Sequence[str]
) -> list[bool]:
    """Loc AG: one flag per raw continuation, against the stored (processed) pre-edit answer."""
    _check_same_length(continuations, pre_edit_answers, "continuations", "pre_edit_answers")
    return [
        postprocess_locality_answer(c, cuts) == a
        for c, a in zip(continuations, pre_edit_answers, strict=True)
    ]


def percent(flags: Sequence[bool]) -> float:
    """The percentage of true flags (an AG reading)."""
    if len(flags) == 0:
        raise ValueError("no examples to average")
    return 100.0 * float(np.mean(np.asarray(flags, dtype=np.float64)))


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean of non-negative numbers; 0 when any is 0 (its limit), as scipy's `hmean`."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("harmonic mean of no values")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"harmonic mean needs finite non-negative values, got {list(values)}")
    if np.any(arr == 0):
        return 0.0
    return float(arr.size / np.sum(1.0 / arr))


def meg_score(
    rel_ag: float, rel_tf: float, gen_ag: float, gen_tf: float, loc_ag: float, loc_tf: float
) -> float:
    """MeG's Score: the harmonic mean of the six percentages (each in [0, 100])."""
    values = (rel_ag, rel_tf, gen_ag, gen_tf, loc_ag, loc_tf)
    if any(v > 100 for v in values):
        raise ValueError(f"Score expects percentages in [0, 100], got {values}")
    return harmonic_mean(values)


def _check_same_length(a: Sequence, b: Sequence, name_a: str, name_b: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{name_a} has {len(a)} items but {name_b} has {len(b)}")
