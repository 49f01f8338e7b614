"""Edit requests as token rows: where the subject ends, which tokens are the target.

Axes: E edits, C context prefixes.

MEMIT reads a fact at its subject's last token ("subject_last") and fits the new value over a
few context prefixes (`"{context}. {prompt}"`) so the edit does not hinge on the prompt's exact
start; the first context is empty (the bare prompt). The prompt an editor sees is the query as
the evaluation asks it: with `prompt="template"` the host's short-answer template wraps the
record's prompt and the target is the answer MeG fits (`" {target}." + eos`), with
`prompt="raw"` the record's prompt and `" {target}"` as in ROME/MEMIT.
"""

import dataclasses
from collections.abc import Sequence

from meg_jax.baselines.edited_host import EditRows
from meg_jax.data.records import EditRecord
from meg_jax.data.templates import PromptTemplate

KL_PROMPT = "{subject} is a"  # MEMIT's "essence" prompt, held at the unedited distribution


@dataclasses.dataclass(frozen=True)
class TextEdit:
    """One edit as text: the prompt the editor fits, its subject and the target continuation."""

    prompt: str
    subject: str
    target: str


def text_edits(records: Sequence[EditRecord], template: PromptTemplate, prompt: str):
    """`TextEdit`s of `records` for `prompt` "template" or "raw" (module docstring)."""
    out = []
    for r in records:
        if r.subject is None:
            raise ValueError(f"{r.source.describe('subject')}: weight editing needs a subject")
        if prompt == "template":
            out.append(TextEdit(template.format_query(r.prompt), r.subject, f" {r.target_new}."))
        elif prompt == "raw":
            out.append(TextEdit(r.prompt, r.subject, f" {r.target_new}"))
        else:
            raise ValueError(f"baseline.prompt: expected 'template' or 'raw', got {prompt!r}")
    return out


def subject_last(tokenizer, text: str, subject: str) -> int:
    """Index of the subject's last token in tokenizer(text); the text's last token when the
    subject does not occur in it (counted by the caller as a fallback)."""
    ids = tokenizer(text)["input_ids"]
    at = text.rfind(subject)
    if at < 0 or not subject:
        return len(ids) - 1
    return min(len(tokenizer(text[: at + len(subject)])["input_ids"]), len(ids)) - 1


def edit_rows(
    tokenizer, edits: Sequence[TextEdit], contexts: Sequence[str], with_target: bool = True
) -> tuple[EditRows, int]:
    """Rows for every (edit, context), edit-major, context 0 first; and how many rows lacked
    their subject (their position fell back to the prompt's last token)."""
    ids, owner, pos, start = [], [], [], []
    missing = 0
    for e, edit in enumerate(edits):
        target = (
            tokenizer(edit.target, add_special_tokens=False)["input_ids"] if with_target else []
        )
        for context in contexts:
            text = f"{context}. {edit.prompt}" if context else edit.prompt
            prompt_ids = tokenizer(text)["input_ids"]
            missing += edit.subject not in text
            ids.append(tuple(prompt_ids) + tuple(target))
            owner.append(e)
            pos.append(subject_last(tokenizer, text, edit.subject))
            start.append(len(prompt_ids) if target else 0)
    return EditRows(tuple(ids), tuple(owner), tuple(pos), tuple(start)), missing


def kl_rows(tokenizer, edits: Sequence[TextEdit]) -> EditRows:
    """One `"{subject} is a"` row per edit, unscored (its last position is read for the KL)."""
    ids, pos = [], []
    for edit in edits:
        text = KL_PROMPT.format(subject=edit.subject)
        ids.append(tuple(tokenizer(text)["input_ids"]))
        pos.append(subject_last(tokenizer, text, edit.subject))
    n = len(edits)
    return EditRows(tuple(ids), tuple(range(n)), tuple(pos), (0,) * n)
