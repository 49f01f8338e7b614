"""MEND/ROME zsRE records (`zsre_mend_eval.json`, `zsre_mend_train*.json`) as `EditRecord`s.

Schema: `src` (the question), `rephrase` (a string, or a list in MeG's GLM-rephrased files),
`answers` (list; `answers[0]` is the correct answer), `alt` (a counterfactual answer), `loc`
(`"nq question: ..."`, an unrelated NQ question), `loc_ans` (its gold answer), `subject`.
Optional: `id` (MeG's re-indexed files), `pred`, `cond` (ignored).

Which answer is the edit target depends on the protocol:
  - `"answers"` (MeG, MEMIT/ROME P1): the correct answer, so zsRE is error *correction*;
  - `"alt"` (EasyEdit): the counterfactual answer, and `answers[0]` becomes `target_true`.

`loc` is kept verbatim (MEMIT evaluates `loc + "?"`); MeG's normalised question ("text after the
prefix, '?' appended, capitalised") is made in `meg_jax.data.preprocess`.
"""

from collections.abc import Mapping
from typing import Any, Literal

from meg_jax.data.records import (
    DataFormatError,
    EditRecord,
    Source,
    optional,
    require_int,
    require_mapping,
    require_str,
    require_str_list,
)

ZsreTarget = Literal["answers", "alt"]
ZSRE_TARGETS = ("answers", "alt")


def zsre_record(obj: Any, source: Source, target: ZsreTarget = "answers") -> EditRecord:
    """One zsRE record; `target` picks `answers[0]` (MeG) or `alt` (EasyEdit) as the new answer."""
    if target not in ZSRE_TARGETS:
        raise ValueError(f"zsRE target must be one of {ZSRE_TARGETS}, got {target!r}")
    record: Mapping[str, Any] = require_mapping(obj, source)
    answers = require_str_list(record, "answers", source)
    if not answers:
        raise DataFormatError(f"{source.describe('answers')}: expected at least one answer")
    if target == "answers":
        target_new, target_true = answers[0], None
    else:
        target_new, target_true = require_str(record, "alt", source), answers[0]
    return EditRecord(
        id=optional(record, "id", require_int, source, default=source.index),
        prompt=require_str(record, "src", source),
        subject=require_str(record, "subject", source),
        target_new=target_new,
        target_true=target_true,
        paraphrases=require_str_list(record, "rephrase", source, allow_str=True),
        locality_prompts=(require_str(record, "loc", source),),
        locality_answers=(require_str(record, "loc_ans", source),),
        generation_prompts=(),
        source=source,
    )
