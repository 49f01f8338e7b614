"""A user-supplied rephrase file: paraphrases that replace (or extend) a dataset's own.

The paper gives every zsRE record 10 rephrases written by GLM-4-9B-Chat (METHOD.md §1.4). That
model cannot run here and its output is not published, so by default Generality and the encoder's
pseudo-edit pairs use the dataset's own MEND rephrase (one per record). Whoever has rephrases
(GLM's, or any other) passes them as `data.rephrases=FILE`.

Accepted forms:

  1. a JSON object mapping a key to a list of rephrases (or one string):
         {"What is the product made by UniFirst?": ["Which product does UniFirst make?"],
          "17": ["..."]}
     A key made of decimal digits is a record id (after merging, `meg_jax.data.sources`); any
     other key is a record's prompt (zsRE `src`), matched exactly.
  2. a JSON array, or JSON Lines, of objects with `rephrases` (or `rephrase`, as MeG's
     GLM-rephrased zsRE files name it) and `src` or `prompt`, else `id`. The MeG reference
     re-indexes its rephrased files per LLM, so their `id`s are not dataset ids: an object's
     prompt, when it has one, is what is matched.

Every rephrase must be a non-empty string of at most `max_chars` characters; a key's list must
not be empty (a record with no paraphrase has no Generality query). Errors name the file and the
key or record index.

`apply_rephrases(records, rephrases, mode)`: `"replace"` (the paper: GLM's rephrases instead of
MEND's) or `"append"` (the dataset's first, then the file's, repeats dropped). A record matched by
its prompt and by its id takes the prompt's entry. Records without an entry keep their own.
"""

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from meg_jax.data.jsonio import parse_records
from meg_jax.data.records import DEFAULT_MAX_CHARS, DataFormatError, EditRecord, Source

REPHRASE_MODES = ("replace", "append")


@dataclasses.dataclass(frozen=True)
class Rephrases:
    """The rephrases of one file, by record prompt and by record id."""

    file: str
    by_prompt: Mapping[str, tuple[str, ...]]
    by_id: Mapping[int, tuple[str, ...]]

    def __len__(self) -> int:
        return len(self.by_prompt) + len(self.by_id)

    def lookup(self, record: EditRecord) -> tuple[str, ...] | None:
        found = self.by_prompt.get(record.prompt)
        return found if found is not None else self.by_id.get(record.id)


def _texts(value: Any, where: str, max_chars: int) -> tuple[str, ...]:
    """A key's rephrases: a non-empty list of non-empty strings (one string is a list of one)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        got = "null" if value is None else type(value).__name__
        raise DataFormatError(f"{where}: expected a list of rephrases (strings), got {got}")
    if not value:
        raise DataFormatError(f"{where}: an empty list; give at least one rephrase or drop it")
    for i, text in enumerate(value):
        if not isinstance(text, str) or not text.strip():
            raise DataFormatError(f"{where}: item {i}: expected a non-empty string, got {text!r}")
        if len(text) > max_chars:
            raise DataFormatError(
                f"{where}: item {i}: {len(text)} characters, more than max_chars={max_chars}"
            )
    return tuple(value)


def _from_mapping(obj: Mapping[str, Any], file: str, max_chars: int) -> Rephrases:
    by_prompt, by_id = {}, {}
    for key, value in obj.items():
        texts = _texts(value, f"{file}: key {key!r}", max_chars)
        if key.isdecimal():
            by_id[int(key)] = texts
        else:
            by_prompt[key] = texts
    return Rephrases(file, by_prompt, by_id)


def _from_list(objects: list[Any], file: str, max_chars: int) -> Rephrases:
    by_prompt: dict[str, tuple[str, ...]] = {}
    by_id: dict[int, tuple[str, ...]] = {}
    for i, obj in enumerate(objects):
        source = Source(file, i)
        if not isinstance(obj, Mapping):
            raise DataFormatError(f"{source.describe()}: expected a JSON object")
        field = "rephrases" if "rephrases" in obj else "rephrase"
        if field not in obj:
            raise DataFormatError(
                f"{source.describe('rephrases')}: missing (or 'rephrase'); found {sorted(obj)}"
            )
        texts = _texts(obj[field], source.describe(field), max_chars)
        key_field = next((k for k in ("src", "prompt") if k in obj), None)
        if key_field is not None:
            key = obj[key_field]
            if not isinstance(key, str) or not key.strip():
                raise DataFormatError(f"{source.describe(key_field)}: expected a non-empty string")
            table: dict = by_prompt
        elif isinstance(obj.get("id"), int) and not isinstance(obj["id"], bool):
            key_field, key, table = "id", obj["id"], by_id
        else:
            raise DataFormatError(
                f"{source.describe()}: no 'src' or 'prompt' (a string) and no integer 'id' to "
                f"match a record by; found fields {sorted(obj)}"
            )
        if key in table and table[key] != texts:
            raise DataFormatError(
                f"{source.describe(key_field)}: {key!r} already has other rephrases earlier in "
                "the file; merge them into one entry"
            )
        table[key] = texts
    return Rephrases(file, by_prompt, by_id)


def read_rephrases(path: str | os.PathLike, max_chars: int = DEFAULT_MAX_CHARS) -> Rephrases:
    """Reads a rephrase file in either form of the module docstring."""
    path = Path(path)
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataFormatError(f"{file}: cannot read the rephrase file ({err})") from None
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None  # JSON Lines, or broken: parse_records says which line
    # One object is a key -> rephrases mapping, unless it is a single record of form 2.
    if isinstance(whole, dict) and not {"rephrase", "rephrases"} & set(whole):
        rephrases = _from_mapping(whole, file, max_chars)
    else:
        objects = [whole] if isinstance(whole, dict) else parse_records(text, file)
        rephrases = _from_list(objects, file, max_chars)
    if not len(rephrases):
        raise DataFormatError(f"{file}: no rephrases in the file")
    return rephrases


def apply_rephrases(
    records: list[EditRecord], rephrases: Rephrases, mode: str = "replace"
) -> tuple[list[EditRecord], int]:
    """(`records` with their paraphrases replaced or extended, how many had an entry)."""
    if mode not in REPHRASE_MODES:
        raise ValueError(f"rephrase mode must be one of {REPHRASE_MODES}, got {mode!r}")
    out, matched = [], 0
    for record in records:
        given = rephrases.lookup(record)
        if given is None:
            out.append(record)
            continue
        matched += 1
        paraphrases = given if mode == "replace" else record.paraphrases + given
        out.append(dataclasses.replace(record, paraphrases=tuple(dict.fromkeys(paraphrases))))
    return out, matched
