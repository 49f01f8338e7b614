"""`load_edits`: an edit set by path, or by name from its canonical public location.

Known names and their files on the ROME/MEMIT data host (https://rome.baulab.info/data/dsets/):

| name                | file                      | format        |
|---------------------|---------------------------|---------------|
| `zsre_eval`         | `zsre_mend_eval.json`     | zsRE          |
| `zsre_train`        | `zsre_mend_train.json`    | zsRE          |
| `counterfact`       | `counterfact.json`        | ROME CounterFact |
| `multi_counterfact` | `multi_counterfact.json`  | ROME CounterFact |

A named file is downloaded once into `cache_dir` (default `$MEG_JAX_CACHE/datasets`, else
`~/.cache/meg_jax/datasets`) and read from there afterwards. The download is checked to be JSON
before it is written (atomically), so a proxy's HTML error page never poisons the cache. Without
network the error says which file to fetch from where and where to put it.
"""

import http.client
import json
import os
import urllib.request
from pathlib import Path

from meg_jax.data.readers import read_edits
from meg_jax.data.readers_zsre import ZsreTarget
from meg_jax.data.records import EditRecord
from meg_jax.infra.files import write_bytes_atomic

DATA_HOST = "https://rome.baulab.info/data/dsets/"
KNOWN_DATASETS = {
    "zsre_eval": "zsre_mend_eval.json",
    "zsre_train": "zsre_mend_train.json",
    "counterfact": "counterfact.json",
    "multi_counterfact": "multi_counterfact.json",
}
_TIMEOUT_S = 60


class DatasetUnavailableError(RuntimeError):
    """A named dataset is not cached and could not be downloaded; the message says what to do."""


def default_cache_dir() -> Path:
    """`$MEG_JAX_CACHE/datasets`, else `~/.cache/meg_jax/datasets`."""
    root = os.environ.get("MEG_JAX_CACHE") or Path.home() / ".cache" / "meg_jax"
    return Path(root) / "datasets"


def fetch_url(url: str) -> bytes:
    """The body of `url` (the one network call; tests replace it)."""
    with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response:
        return response.read()


def dataset_path(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Local path of known dataset `name`, downloading it on first use."""
    if name not in KNOWN_DATASETS:
        raise ValueError(f"unknown dataset name {name!r}; known: {sorted(KNOWN_DATASETS)}")
    filename = KNOWN_DATASETS[name]
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / filename
    if path.is_file():
        return path
    url = DATA_HOST + filename
    try:
        data = fetch_url(url)
    except (OSError, http.client.HTTPException) as err:  # URLError and timeouts are OSErrors
        raise DatasetUnavailableError(
            f"dataset {name!r} is not in {path.parent} and downloading {url} failed ({err}). "
            f"Download it by hand, e.g. `curl -L -o {path} {url}`, then run again."
        ) from err
    try:
        json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetUnavailableError(
            f"downloading {url} returned {len(data)} bytes that are not JSON ({err}); nothing "
            f"was written. Download it by hand to {path}."
        ) from None
    write_bytes_atomic(path, data)
    return path


def load_edits(
    name_or_path: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    format: str | None = None,
    zsre_target: ZsreTarget = "answers",
    limit: int | None = None,
) -> list[EditRecord]:
    """Edit records from a local file, or from a known dataset name (see the module table).

    An existing path always wins over a name, so a local file called `counterfact` is read as is.
    `format`, `zsre_target` and `limit` are passed to `meg_jax.data.readers.read_edits`.
    """
    path = Path(name_or_path)
    if not path.is_file():
        if str(name_or_path) not in KNOWN_DATASETS:
            raise FileNotFoundError(
                f"{name_or_path}: no such file, and not a known dataset name "
                f"({sorted(KNOWN_DATASETS)})"
            )
        path = dataset_path(str(name_or_path), cache_dir)
    return read_edits(path, format=format, zsre_target=zsre_target, limit=limit)
