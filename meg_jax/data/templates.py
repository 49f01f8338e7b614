r"""Per-model prompt templates, answer suffixes and AG cut rules, as the MeG reference uses them.

Every query sent to the host LLM is wrapped in a short-answer template (METHOD.md §1.3). The
answer used when fitting a neuron is `" {answer}." + eos_text`. After greedy generation the
continuation is cut at model-specific stop strings before it is compared with a target.

  gptj          `Q: Answer the following question in less than 5 words. {q}\nA:`
                eos `<|endoftext|>`; Rel/Gen cut at `\` then `\n`; Loc cut at `\n`
  phi2          `Instruct:Answer the following question in less than 5 words. {q}\nOutput:`
                eos `<|endoftext|>`; no cuts
  llama3        `Answer the following question in less than 5 words: {q} \nAnswer:`
                eos `<|end_of_text|>`; cuts as gptj
  smollm2       the Llama-3 template (what the shared SmolLM2 weight bank was fitted with)
                eos `<|im_end|>`; cuts as gptj
  smollm2_qa    two-shot `Q: ...\nA: ...` (the SmolLM2 default: it answers every neighbourhood
                prompt in a few words, see configs/smollm2_cf.py); eos `<|im_end|>`; cuts as gptj
  smollm2_chat  `<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n`
                eos `<|im_end|>`; cuts as gptj

Why two cut lists: the reference cuts Rel/Gen predictions (GPT-J) at the first backslash and
then the first newline, but its pre-edit answers and Loc predictions only at the first newline
(`get_edit_and_loc_data.py`, `evaluate_lr_*`). Phi-2 is generated to 200 tokens with no cut at
all. The reference has no Llama-3 evaluation path; Llama-3 and SmolLM2 follow GPT-J, as
METHOD.md states ("GPT-J/Llama: cut at the first backslash and the first newline").
"""

import dataclasses

PLACEHOLDER = "{query}"


def fill_template(template: str, question: str) -> str:
    """`template` with its one `{query}` replaced by `question`: the one formatter of host
    prompts and encoder views."""
    if template.count(PLACEHOLDER) != 1:
        raise ValueError(f"template {template!r} must contain {PLACEHOLDER} exactly once")
    # replace, not str.format: questions may contain braces
    return template.replace(PLACEHOLDER, question)


_SHORT_ANSWER = "Answer the following question in less than 5 words"
_BOTH_CUTS = ("\\", "\n")
_NEWLINE_CUT = ("\n",)


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    """How one host model is queried and how its answers are read.

    Attributes:
      name: registry name.
      query: the template, with `{query}` where the question goes.
      eos_text: the end-of-sequence text appended to the fitting answer.
      answer_cuts: stop strings for Rel/Gen AG predictions, applied in order.
      locality_cuts: stop strings for pre-edit answers and Loc AG predictions.
    """

    name: str
    query: str
    eos_text: str
    answer_cuts: tuple[str, ...]
    locality_cuts: tuple[str, ...]

    def format_query(self, question: str) -> str:
        """The full prompt for `question`."""
        return fill_template(self.query, question)

    @property
    def generation_stops(self) -> tuple[str, ...]:
        """The one-character cuts that every query kind (Rel/Gen and Loc) applies: a generation
        may end at the first token containing one, since every reading discards what follows."""
        return tuple(c for c in self.answer_cuts if len(c) == 1 and c in self.locality_cuts)

    def format_answer(self, answer: str) -> str:
        """The text the model is fitted to produce after the prompt: `" {answer}." + eos`."""
        return f" {answer}.{self.eos_text}"


TEMPLATES: dict[str, PromptTemplate] = {
    t.name: t
    for t in (
        PromptTemplate(
            "gptj", f"Q: {_SHORT_ANSWER}. {{query}}\nA:", "<|endoftext|>", _BOTH_CUTS, _NEWLINE_CUT
        ),
        PromptTemplate(
            "phi2", f"Instruct:{_SHORT_ANSWER}. {{query}}\nOutput:", "<|endoftext|>", (), ()
        ),
        PromptTemplate(
            "llama3",
            f"{_SHORT_ANSWER}: {{query}} \nAnswer:",
            "<|end_of_text|>",
            _BOTH_CUTS,
            _NEWLINE_CUT,
        ),
        PromptTemplate(
            "smollm2",
            f"{_SHORT_ANSWER}: {{query}} \nAnswer:",
            "<|im_end|>",
            _BOTH_CUTS,
            _NEWLINE_CUT,
        ),
        PromptTemplate(
            "smollm2_qa",
            "Q: The capital of France is\nA: Paris.\n"
            "Q: Who wrote Hamlet?\nA: William Shakespeare.\nQ: {query}\nA:",
            "<|im_end|>",
            _BOTH_CUTS,
            _NEWLINE_CUT,
        ),
        PromptTemplate(
            "smollm2_chat",
            "<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n",
            "<|im_end|>",
            _BOTH_CUTS,
            _NEWLINE_CUT,
        ),
    )
}


def get_template(name: str) -> PromptTemplate:
    """The template registered as `name` (see the module table)."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown prompt template {name!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[name]
