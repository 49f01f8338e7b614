"""A user's own edits, in the plain schema meg_jax defines (JSON array or JSON Lines).

Each record:

    {"prompt": "The capital of Freedonia is", "target": "Fredville",          # required
     "subject": "Freedonia",                                                  # optional
     "paraphrases": ["Freedonia's capital city is"],                          # optional
     "locality_prompts": ["The capital of France is"],                        # optional
     "locality_answers": ["Paris"],                                           # optional
     "target_true": "Old Town", "generation_prompts": [...], "id": 7}         # optional

Because this schema is ours, unknown keys are an error (a misspelt `paraphrase` would otherwise
silently drop every paraphrase). `paraphrases` and `locality_prompts` may be a single string.
"""

from typing import Any

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

USER_FIELDS = (
    "id",
    "prompt",
    "target",
    "subject",
    "target_true",
    "paraphrases",
    "locality_prompts",
    "locality_answers",
    "generation_prompts",
)


def _str_or_list(record, field, source):
    return require_str_list(record, field, source, allow_str=True)


def user_record(obj: Any, source: Source) -> EditRecord:
    """One record of the plain user schema (see the module docstring)."""
    record = require_mapping(obj, source)
    unknown = sorted(set(record) - set(USER_FIELDS))
    if unknown:
        raise DataFormatError(
            f"{source.describe(unknown[0])}: unknown field(s) {unknown}; "
            f"expected some of {list(USER_FIELDS)}"
        )
    return EditRecord(
        id=optional(record, "id", require_int, source, default=source.index),
        prompt=require_str(record, "prompt", source),
        subject=optional(record, "subject", require_str, source),
        target_new=require_str(record, "target", source),
        target_true=optional(record, "target_true", require_str, source),
        paraphrases=optional(record, "paraphrases", _str_or_list, source, ()),
        locality_prompts=optional(record, "locality_prompts", _str_or_list, source, ()),
        locality_answers=optional(record, "locality_answers", _str_or_list, source, ()),
        generation_prompts=optional(record, "generation_prompts", require_str_list, source, ()),
        source=source,
    )
