"""Reading a host model's answers: cut rules, post-processing and matching (METHOD.md §1.3).

These belong with the prompt templates (`meg_jax.data.templates` names each template's cuts):
the same reading serves the pre-edit answers of preprocessing, weight collection's success test
and the evaluator's AG metrics.

AG post-processing, exactly as the reference (`evaluate_*_self_and_tf_parallel.py`):
  Rel/Gen: cut the decoded continuation at each of the template's `answer_cuts` in order
    (GPT-J: first backslash, then first newline); strip trailing whitespace; drop one trailing
    "." (the reference's `adjust_dots`: ".." keeps one dot). Correct iff
    `prediction.lower() == (" " + target).lower()`; the lenient variant (the reference's
    baseline path) is `prediction.lower().startswith((" " + target).lower())`.
  Loc: cut at the template's `locality_cuts`, then `.strip().rstrip(".")` (all trailing dots).
"""

from collections.abc import Sequence
from typing import Literal, Protocol

MatchRule = Literal["exact", "startswith"]


class GreedyGenerateFn(Protocol):
    """Greedy decoding: the decoded continuation of each prompt, special tokens skipped.

    The prompt is not part of the returned text. MeG generates at most 20 new tokens (Phi-2:
    200 tokens in total); that limit is the generator's business, not the metric's.
    """

    def __call__(self, prompts: list[str]) -> list[str]: ...


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
