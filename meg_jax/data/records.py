"""The one in-memory form of an edit request, whatever file it came from.

Every reader (zsRE, CounterFact, EasyEdit flat CounterFact, user JSON) produces `EditRecord`s, so
the stages after loading never see a dataset's own schema. Each record remembers where it came
from (`Source`: file and record index) so that any later error can point at the line to fix.

The field checkers here are shared by the readers: each raises a `DataFormatError` that names the
file, the record index and the field, and says what was expected and what was found.
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any


class DataFormatError(ValueError):
    """An edit file is malformed; the message names the file, record index and field."""


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# The default bound on any one text of a record (prompt, target, paraphrase...), in characters.
# Generous for facts and questions (CounterFact's longest prompt is ~150 characters), yet far
# below what would make a padded batch of token ids exhaust memory late in a run.
DEFAULT_MAX_CHARS = 2000
_TEXT_FIELDS = ("prompt", "subject", "target_new", "target_true")
_TEXT_LISTS = ("paraphrases", "locality_prompts", "locality_answers", "generation_prompts")


def check_text_lengths(record: "EditRecord", max_chars: int) -> None:
    """Every text of `record` has at most `max_chars` characters, else an error naming it."""
    texts = [(name, getattr(record, name)) for name in _TEXT_FIELDS]
    for name in _TEXT_LISTS:
        texts += [(f"{name}[{i}]", text) for i, text in enumerate(getattr(record, name))]
    for name, text in texts:
        if text is not None and len(text) > max_chars:
            raise DataFormatError(
                f"{record.source.describe(name)}: {len(text)} characters, more than the bound "
                f"max_chars={max_chars}; shorten the text, or raise the bound if it is meant"
            )


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a record was read: `file` (a path, as given) and its 0-based `index` in that file."""

    file: str
    index: int

    def describe(self, field: str | None = None) -> str:
        """`"path: record 3"` or `"path: record 3, field 'src'"`, the prefix of every error."""
        where = f"{self.file}: record {self.index}"
        return f"{where}, field {field!r}" if field is not None else where


@dataclasses.dataclass(frozen=True)
class EditRecord:
    """One fact to edit, with the prompts every metric needs.

    Attributes:
      id: the dataset's id for the fact (CounterFact `case_id`, else the record's position).
      prompt: the edit query x_e, subject already filled in.
      subject: the entity the fact is about (None when the source has none).
      target_new: the answer the edited model must give.
      target_true: the answer it replaces, when the dataset states it (CounterFact).
      paraphrases: equivalent queries x_eq (MeG's Generality uses the first).
      locality_prompts: unrelated queries x_u (MeG's Locality uses the first).
      locality_answers: the dataset's gold answers to `locality_prompts`, one each, or empty when
        the dataset has none. MeG's own Locality label is the unedited model's answer instead,
        computed in `meg_jax.data.preprocess`.
      generation_prompts: free-generation prefixes (CounterFact fluency); often empty.
      source: where the record was read, for error messages.
    """

    id: int
    prompt: str
    subject: str | None
    target_new: str
    target_true: str | None
    paraphrases: tuple[str, ...]
    locality_prompts: tuple[str, ...]
    locality_answers: tuple[str, ...]
    generation_prompts: tuple[str, ...]
    source: Source

    def __post_init__(self):
        if self.locality_answers and len(self.locality_answers) != len(self.locality_prompts):
            raise DataFormatError(
                f"{self.source.describe('locality_answers')}: expected one answer per locality "
                f"prompt ({len(self.locality_prompts)}), got {len(self.locality_answers)}"
            )

    def content(self) -> dict[str, Any]:
        """The record's fields without `source`: what identifies the fact, not where it was read."""
        fields = dataclasses.asdict(self)
        del fields["source"]
        return fields

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists); `from_json` inverts it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "EditRecord":
        """Inverse of `to_json`."""
        values = dict(obj)
        values["source"] = Source(**values["source"])
        for name in ("paraphrases", "locality_prompts", "locality_answers", "generation_prompts"):
            values[name] = tuple(values[name])
        return cls(**values)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _name(field: str, parent: str) -> str:
    return f"{parent}.{field}" if parent else field


def require_mapping(value: Any, source: Source, field: str | None = None) -> Mapping[str, Any]:
    """`value` as a JSON object, else an error naming the record (and `field`, if nested)."""
    if not isinstance(value, Mapping):
        raise DataFormatError(
            f"{source.describe(field)}: expected a JSON object, got {_type_name(value)}"
        )
    return value


def require_field(record: Mapping[str, Any], field: str, source: Source, parent: str = "") -> Any:
    """`record[field]`, else an error listing the fields the record does have.

    `parent` is the dotted path of a nested object (`"requested_rewrite"`), used in messages.
    """
    if field not in record:
        raise DataFormatError(
            f"{source.describe(_name(field, parent))}: missing; found fields {sorted(record)}"
        )
    return record[field]


def require_str(record: Mapping[str, Any], field: str, source: Source, parent: str = "") -> str:
    """A string field; an empty or whitespace-only string is an error too."""
    value = require_field(record, field, source, parent)
    where = source.describe(_name(field, parent))
    if not isinstance(value, str):
        raise DataFormatError(f"{where}: expected a string, got {_type_name(value)}")
    if not value.strip():
        raise DataFormatError(f"{where}: expected a non-empty string")
    return value


def require_int(record: Mapping[str, Any], field: str, source: Source, parent: str = "") -> int:
    """An integer field within int64 (a JSON bool is not accepted as an integer).

    Every integer of the edit schemas is an id, and ids are stored as int64 (banks, caches,
    jitted arrays): a larger one would overflow far downstream, after minutes of work.
    """
    value = require_field(record, field, source, parent)
    where = source.describe(_name(field, parent))
    if not isinstance(value, int) or isinstance(value, bool):
        raise DataFormatError(f"{where}: expected an integer, got {_type_name(value)}")
    if not INT64_MIN <= value <= INT64_MAX:
        raise DataFormatError(
            f"{where}: {value} is outside the int64 range [{INT64_MIN}, {INT64_MAX}] that ids "
            "are stored in; renumber the record"
        )
    return value


def require_str_list(
    record: Mapping[str, Any], field: str, source: Source, allow_str: bool = False
) -> tuple[str, ...]:
    """A list of strings; with `allow_str`, a single string is read as a one-item list."""
    value = require_field(record, field, source)
    if allow_str and isinstance(value, str):
        value = [value]
    where = source.describe(field)
    if not isinstance(value, list):
        expected = "a string or a list of strings" if allow_str else "a list of strings"
        raise DataFormatError(f"{where}: expected {expected}, got {_type_name(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise DataFormatError(f"{where}: item {i}: expected a string, got {_type_name(item)}")
    return tuple(value)


def optional(
    record: Mapping[str, Any],
    field: str,
    read: Callable[[Mapping[str, Any], str, Source], Any],
    source: Source,
    default: Any = None,
) -> Any:
    """`read(record, field, source)` when the field is present and not null, else `default`."""
    if record.get(field) is None:
        return default
    return read(record, field, source)
