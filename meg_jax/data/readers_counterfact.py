"""CounterFact records as `EditRecord`s: ROME/MEMIT's nested form and EasyEdit's flat form.

ROME/MEMIT (`counterfact.json`, `multi_counterfact.json`):
  `case_id`, `requested_rewrite{prompt (with "{}" for the subject), subject, target_new{str},
  target_true{str}}`, `paraphrase_prompts` (list), `neighborhood_prompts` (list of strings),
  `generation_prompts` (list, optional); `attribute_prompts` and the rest are ignored.
  The gold answer of every neighbourhood prompt is the edited fact's true object, because
  neighbourhood subjects share the relation and the original object (ROME's NS compares
  P(target_true) with P(target_new) there), so `locality_answers` repeats `target_true`.

EasyEdit flat (`counterfact-edit.json` and friends):
  `case_id`, `prompt` (subject filled in), `subject`, `target_new`, `ground_truth`,
  `rephrase_prompt` (string or list), `locality_prompt`, `locality_ground_truth`.
"""

from typing import Any

from meg_jax.data.records import (
    DataFormatError,
    EditRecord,
    Source,
    optional,
    require_field,
    require_int,
    require_mapping,
    require_str,
    require_str_list,
)


def rome_counterfact_record(obj: Any, source: Source) -> EditRecord:
    """One record of ROME/MEMIT's `counterfact.json` / `multi_counterfact.json`."""
    record = require_mapping(obj, source)
    rewrite = require_mapping(
        require_field(record, "requested_rewrite", source), source, "requested_rewrite"
    )
    template = require_str(rewrite, "prompt", source, parent="requested_rewrite")
    if "{}" not in template:
        raise DataFormatError(
            f"{source.describe('requested_rewrite.prompt')}: expected a '{{}}' placeholder for "
            f"the subject, got {template!r}"
        )
    subject = require_str(rewrite, "subject", source, parent="requested_rewrite")
    target_new = _target_str(rewrite, "target_new", source)
    target_true = _target_str(rewrite, "target_true", source)
    neighborhood = require_str_list(record, "neighborhood_prompts", source)
    return EditRecord(
        id=require_int(record, "case_id", source),
        # replace, not str.format: a prompt with other braces must not be parsed as a template
        prompt=template.replace("{}", subject),
        subject=subject,
        target_new=target_new,
        target_true=target_true,
        paraphrases=require_str_list(record, "paraphrase_prompts", source),
        locality_prompts=neighborhood,
        locality_answers=(target_true,) * len(neighborhood),
        generation_prompts=optional(record, "generation_prompts", require_str_list, source, ()),
        source=source,
    )


def _target_str(rewrite: Any, field: str, source: Source) -> str:
    """`requested_rewrite.<field>.str`, the answer string inside ROME's `{str, id}` object."""
    parent = f"requested_rewrite.{field}"
    target = require_field(rewrite, field, source, parent="requested_rewrite")
    return require_str(require_mapping(target, source, parent), "str", source, parent=parent)


def easyedit_counterfact_record(obj: Any, source: Source) -> EditRecord:
    """One record of EasyEdit's flat CounterFact (`case_id, prompt, target_new, ...`)."""
    record = require_mapping(obj, source)
    locality_prompt = require_str(record, "locality_prompt", source)
    return EditRecord(
        id=optional(record, "case_id", require_int, source, default=source.index),
        prompt=require_str(record, "prompt", source),
        subject=require_str(record, "subject", source),
        target_new=require_str(record, "target_new", source),
        target_true=require_str(record, "ground_truth", source),
        paraphrases=require_str_list(record, "rephrase_prompt", source, allow_str=True),
        locality_prompts=(locality_prompt,),
        locality_answers=(require_str(record, "locality_ground_truth", source),),
        generation_prompts=(),
        source=source,
    )
