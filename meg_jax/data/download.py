"""`load_edits`: an edit set by path, or by name from its canonical public location.

Known names and their files on the ROME/MEMIT data host (https://rome.baulab.info/data/dsets/):

| name                | file                      | format        |
|---------------------|---------------------------|---------------|
| `zsre_eval`         | `zsre_mend_eval.json`     | zsRE          |
| `zsre_train`        | `zsre_mend_train.json`    | zsRE          |
| `counterfact`       | `counterfact.json`        | ROME CounterFact |
| `multi_counterfact` | `multi_counterfact.json`  | ROME CounterFact |

and the EasyEdit split of CounterFact the default config edits (`counterfact_edit`,
`counterfact_train`: `counterfact-edit.json`, `counterfact-train.json` of the public
KnowledgeSpread repository at a fixed commit; see `EASYEDIT_CF`).

A named file is downloaded once into `cache_dir` (default `$MEG_JAX_CACHE/datasets`, else
`~/.cache/meg_jax/datasets`) and read from there afterwards. The download is checked to be JSON
before it is written (atomically), so a proxy's HTML error page never poisons the cache. Without
network the error says which file to fetch from where and where to put it.

Checksums. A download is checked against the SHA-256 pinned in `KNOWN_SHA256`; a mismatch
writes nothing and names the URL and both hashes. For a file whose hash is not pinned (none is
yet: the canonical files could not be fetched when this was written, and the copies in
../shared/data are other files) the hash is recorded on first download, trust on first use, in
`<file>.sha256` beside it. Every later use checks the cached file against the pinned or recorded
hash, so a cached copy that was cut short or altered is deleted and reported, never read.
"""

import hashlib
import http.client
import json
import logging
import os
import urllib.request
from pathlib import Path

from meg_jax.data.readers import read_edits
from meg_jax.data.readers_zsre import ZsreTarget
from meg_jax.data.records import DEFAULT_MAX_CHARS, EditRecord
from meg_jax.infra.files import write_bytes_atomic

DATA_HOST = "https://rome.baulab.info/data/dsets/"
# The EasyEdit CounterFact split (one paraphrase and one neighbourhood prompt per case), as the
# project's default config uses it, from the repository ../shared/data copied it from, at a commit.
EASYEDIT_CF = (
    "https://raw.githubusercontent.com/Jometeorie/KnowledgeSpread/"
    "d1a8d1ed5367e66010d4d9b081ab388b46c2438c/data/counterfact/"
)
# A name's file on DATA_HOST, or its full URL.
KNOWN_DATASETS = {
    "zsre_eval": "zsre_mend_eval.json",
    "zsre_train": "zsre_mend_train.json",
    "counterfact": "counterfact.json",
    "multi_counterfact": "multi_counterfact.json",
    "counterfact_edit": EASYEDIT_CF + "counterfact-edit.json",
    "counterfact_train": EASYEDIT_CF + "counterfact-train.json",
}
# SHA-256 of the canonical files; None: not known yet, recorded on first download instead.
KNOWN_SHA256: dict[str, str | None] = {name: None for name in KNOWN_DATASETS}
_TIMEOUT_S = 60

log = logging.getLogger(__name__)


class DatasetUnavailableError(RuntimeError):
    """A named dataset is not cached and could not be downloaded; the message says what to do."""


class ChecksumError(DatasetUnavailableError):
    """A downloaded or cached dataset file does not have its pinned or recorded SHA-256."""


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _expected_sha256(name: str, path: Path) -> tuple[str | None, str]:
    """(hash the file must have, where that hash comes from), or (None, "") if none is known."""
    pinned = KNOWN_SHA256.get(name)
    if pinned:
        return pinned.lower(), "pinned in meg_jax.data.download.KNOWN_SHA256"
    record = _record_path(path)
    if record.is_file():
        return record.read_text().split()[0].lower(), (
            f"recorded at first download in {record}; if the file changed on purpose, delete "
            "that record to accept the new one"
        )
    return None, ""


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _check_cached(name: str, path: Path, url: str) -> None:
    expected, origin = _expected_sha256(name, path)
    actual = sha256_of(path.read_bytes())
    if expected is None:
        # A file placed by hand, or cached before checksums were kept: trust it from now on.
        write_bytes_atomic(_record_path(path), f"{actual}  {path.name}\n".encode())
        log.info("%s: recorded its SHA-256 %s (trusted on first use)", path, actual)
        return
    if actual != expected:
        path.unlink()
        raise ChecksumError(
            f"{path}: the cached copy of {url} has SHA-256 {actual}, but {expected} is expected "
            f"({origin}); it was cut short or altered, and has been deleted. Run again to "
            "download it afresh"
        )


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
    source = KNOWN_DATASETS[name]
    url = source if "://" in source else DATA_HOST + source
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / url.rsplit("/", 1)[1]
    if path.is_file():
        _check_cached(name, path, url)
        return path
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
    actual = sha256_of(data)
    expected, origin = _expected_sha256(name, path)
    if expected is not None and actual != expected:
        path.unlink(missing_ok=True)
        raise ChecksumError(
            f"downloading {url} gave {len(data)} bytes with SHA-256 {actual}, but {expected} is "
            f"expected ({origin}); nothing was written to {path}. The download was damaged or "
            "the file changed on the server: try again, or download it by hand and compare"
        )
    write_bytes_atomic(path, data)
    if expected is None:
        write_bytes_atomic(_record_path(path), f"{actual}  {path.name}\n".encode())
        log.info("%s: downloaded from %s, SHA-256 %s recorded", path, url, actual)
    return path


def load_edits(
    name_or_path: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    format: str | None = None,
    zsre_target: ZsreTarget = "answers",
    limit: int | None = None,
    max_chars: int = DEFAULT_MAX_CHARS,
) -> list[EditRecord]:
    """Edit records from a local file, or from a known dataset name (see the module table).

    An existing path always wins over a name, so a local file called `counterfact` is read as is.
    `format`, `zsre_target`, `limit` (None for all, else >= 1) and `max_chars` are passed to
    `meg_jax.data.readers.read_edits`; a bad `limit` fails before any download.
    """
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"limit: expected a positive integer or None, got {limit!r}")
    path = Path(name_or_path)
    if not path.is_file():
        if str(name_or_path) not in KNOWN_DATASETS:
            raise FileNotFoundError(
                f"{name_or_path}: no such file, and not a known dataset name "
                f"({sorted(KNOWN_DATASETS)})"
            )
        path = dataset_path(str(name_or_path), cache_dir)
    return read_edits(
        path, format=format, zsre_target=zsre_target, limit=limit, max_chars=max_chars
    )
