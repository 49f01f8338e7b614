"""Reading edit files: a JSON array or JSON Lines.

A JSON array is recognised by its first non-blank character `[`; anything else is read as JSON
Lines, one object per non-blank line. Parse errors name the file and the line (and, for JSON
Lines, the record index) so that a broken download or a hand-edited file is easy to fix.
"""

import json
import os
from pathlib import Path
from typing import Any

from meg_jax.data.records import DataFormatError


def parse_records(text: str, file: str) -> list[Any]:
    """The records of a JSON-array or JSON-Lines document; `file` is only used in errors."""
    stripped = text.lstrip()
    if not stripped:
        raise DataFormatError(f"{file}: the file is empty; expected a JSON array or JSON Lines")
    if stripped[0] == "[":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataFormatError(
                f"{file}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}"
            ) from None
        if not isinstance(records, list):
            raise DataFormatError(f"{file}: expected a JSON array of records")
        return records
    records = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataFormatError(
                f"{file}: record {len(records)} (line {line_no}): malformed JSON at column "
                f"{err.colno}: {err.msg} (JSON Lines expects one object per line)"
            ) from None
    return records


def read_records(path: str | os.PathLike) -> list[Any]:
    """Reads the records of a JSON-array or JSON-Lines file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataFormatError(f"{path}: cannot read the file: {err.strerror or err}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{path}: not UTF-8 text (byte {err.start})") from None
    return parse_records(text, str(path))
