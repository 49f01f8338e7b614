"""Where an edit file comes from: one resolution order for every dataset a config names.

    1. an existing path (absolute, or relative to the working directory) is read as it is;
    2. a relative name found under a data directory: `$MEG_JAX_DATA`, then `../shared/data`
       beside the working directory or beside this checkout (the project's shared data);
    3. a known dataset name (`meg_jax.data.download.KNOWN_DATASETS`), or a relative name that
       stands for one (`CANONICAL`), downloaded once into the cache.
Offline, step 3 fails with a message naming the file and where to put it. `locate` returns the
path with a line saying which step found it, which the pipeline prints.
"""

import os
from pathlib import Path

from meg_jax.data.download import KNOWN_DATASETS, dataset_path

ENV_DATA_DIR = "MEG_JAX_DATA"
_CHECKOUT = Path(__file__).resolve().parents[2]

# Names under the data directory that have a canonical download.
CANONICAL = {
    "counterfact/counterfact-edit.json": "counterfact_edit",
    "counterfact/counterfact-train.json": "counterfact_train",
    "counterfact/counterfact.json": "counterfact",
    "counterfact/multi_counterfact.json": "multi_counterfact",
    "zsre/zsre_mend_eval.json": "zsre_eval",
    "zsre/zsre_mend_train.json": "zsre_train",
}

# Names the paper uses that have no pinned public download: where a user gets them. `locate`'s
# error quotes this, so an offline (or any) run says what to place where.
MANUAL = {
    "zsre/zsre_mend_train_10000.json": (
        "the 10,000-record zsRE train file of EasyEdit's data release (MEND's zsRE split, "
        "same schema as zsre_mend_eval.json); the paper merges it with zsre_mend_eval.json"
    ),
}


def data_dirs() -> list[Path]:
    """The data directories searched, in order."""
    dirs = [Path(os.environ[ENV_DATA_DIR])] if os.environ.get(ENV_DATA_DIR) else []
    dirs += [Path.cwd().parent / "shared" / "data", _CHECKOUT.parent / "shared" / "data"]
    return list(dict.fromkeys(d.resolve() for d in dirs))


def locate(name: str, cache_dir: str | os.PathLike | None = None) -> tuple[Path, str]:
    """(path, how it was found) of an edit file named in a config (module docstring)."""
    path = Path(name).expanduser()
    if path.is_file():
        return path, f"{name}: the given path"
    if not path.is_absolute():
        for folder in data_dirs():
            if (folder / path).is_file():
                return folder / path, f"{name}: found in the data directory {folder}"
    dataset = name if name in KNOWN_DATASETS else CANONICAL.get(Path(name).as_posix())
    if dataset is not None:
        return dataset_path(dataset, cache_dir), f"{name}: the {dataset!r} dataset (cache)"
    searched = ", ".join(str(d) for d in data_dirs())
    manual = MANUAL.get(Path(name).as_posix())
    if manual is not None:
        first = data_dirs()[0] if data_dirs() else Path(f"${ENV_DATA_DIR}")
        raise FileNotFoundError(
            f"{name}: not found under the data directories ({searched}) and it has no pinned "
            f"download. It is {manual}. Place it at {first / name} (or set ${ENV_DATA_DIR} to "
            "a folder holding it), or give its full path."
        )
    raise FileNotFoundError(
        f"{name}: no such file, not under a data directory ({searched}; set ${ENV_DATA_DIR} to "
        f"add one) and not a known dataset name ({sorted(KNOWN_DATASETS)}). Put the file at "
        f"{Path(searched.split(', ')[0]) / name} or give its full path."
    )
