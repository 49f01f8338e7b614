"""MeG's metrics (protocol P5), model-agnostic: AG string matching and the Score.

Reliability, Generality and Locality are each read two ways (METHOD.md §1.3):
  - AG (prefix-autoregressive generation): the greedy continuation, cut and stripped as here,
    compared as a string. This module.
  - TF (teacher forcing): token top-1 accuracy. `meg_jax.evaluation.teacher_forcing`.
Score is the harmonic mean of the six percentages.

Nothing here runs a model. A model enters through two small protocols, so the batched evaluator
(and tests) can plug in anything: `GreedyGenerateFn` (prompts -> decoded continuations) and
`LogitsFn` (token ids -> logits).

Axes: B batch, T tokens, V vocabulary.

AG post-processing, exactly as the reference (`evaluate_*_self_and_tf_parallel.py`):
  Rel/Gen: cut the decoded continuation at each of the template's `answer_cuts` in order
    (GPT-J: first backslash, then first newline); strip trailing whitespace; drop one trailing
    "." (the reference's `adjust_dots`: ".." keeps one dot). Correct iff
    `prediction.lower() == (" " + target).lower()`; the lenient variant (the reference's
    baseline path) is `prediction.lower().startswith((" " + target).lower())`.
  Loc: cut at the template's `locality_cuts`, then `.strip().rstrip(".")` (all trailing dots).
    Correct iff equal, case-sensitively, to the stored pre-edit answer, which is the unedited
    model's continuation processed by the same function (`meg_jax.data.preprocess`).
"""

from collections.abc import Sequence
from typing import Literal, Protocol

import numpy as np

MatchRule = Literal["exact", "startswith"]


class GreedyGenerateFn(Protocol):
    """Greedy decoding: the decoded continuation of each prompt, special tokens skipped.

    The prompt is not part of the returned text. MeG generates at most 20 new tokens (Phi-2:
    200 tokens in total); that limit is the generator's business, not the metric's.
    """

    def __call__(self, prompts: list[str]) -> list[str]: ...


class LogitsFn(Protocol):
    """One forward pass: `input_ids` [B, T] int32 and `attention_mask` [B, T] (1 = real token,
    right-padded) -> logits [B, T, V]. Only positions under the mask are read."""

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray: ...


def cut_at(text: str, cuts: Sequence[str]) -> str:
    """`text` up to the first occurrence of each stop string, applied in order."""
    for stop in cuts:
        text = text.split(stop, 1)[0]
    return text


def postprocess_answer(continuation: str, cuts: Sequence[str]) -> str:
    """A Rel/Gen AG prediction: cut, strip trailing whitespace, drop one trailing "."."""
    text = cut_at(continuation, cuts).rstrip()
    return text[:-1] if text.endswith(".") else text


def postprocess_locality_answer(continuation: str, cuts: Sequence[str]) -> str:
    """A Loc AG prediction or pre-edit answer: cut, `.strip()`, then `.rstrip(".")`."""
    return cut_at(continuation, cuts).strip().rstrip(".")


def answer_matches(prediction: str, target: str, rule: MatchRule = "exact") -> bool:
    """Whether a post-processed prediction states `target` (the prediction keeps its leading
    space, so it is compared with `" " + target`), case-insensitively.

    `rule="exact"` is MeG's; `"startswith"` is the lenient rule of the reference's baseline path.
    """
    label = (" " + target).lower()
    if rule == "exact":
        return prediction.lower() == label
    if rule == "startswith":
        return prediction.lower().startswith(label)
    raise ValueError(f"unknown match rule {rule!r}; expected 'exact' or 'startswith'")


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
