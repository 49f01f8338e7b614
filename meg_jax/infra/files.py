"""Atomic writes: a temporary file in the destination folder, then `os.replace`.

A crash never leaves a half-written file under the final name, so a result that exists is whole.

Several processes (`meg_jax.infra.distributed`) run the same program and reach the same writes
with the same bytes: process 0 alone writes, between two barriers named after the file. The one
after it: no process reads a result before it is whole. The one before it: no process reads a
file too late either, i.e. after process 0 already replaced it with what comes later in the
program (a memo file read at one point and rewritten further on would otherwise hold more for
a slower process than for process 0, and the two would take different paths). A process whose
program took another path (another file name at this point) fails the barrier instead.
"""

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from meg_jax.infra.distributed import barrier, is_main_process

_FILE_MODE = 0o644


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to `path` through a temporary file in the same folder and a rename.

    Under several processes, process 0 writes once all have arrived, and all wait until it
    has (collective: every process must call it, in the same order; module docstring).
    """
    path = Path(path)
    barrier(f"before write {path}")
    if is_main_process():
        _write(path, data)
    barrier(f"write {path}")


def write_npz_atomic(path: str | os.PathLike, **arrays) -> None:
    """`np.savez(path, **arrays)` through `write_bytes_atomic` (collective in the same way)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_bytes_atomic(path, buffer.getvalue())


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)  # mkstemp creates 0600; results are for others to read too
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Writes `obj` as UTF-8 JSON to `path` atomically."""
    data = json.dumps(obj, ensure_ascii=False, indent=1).encode("utf-8")
    write_bytes_atomic(path, data)
