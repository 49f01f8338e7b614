"""The command line of `meg_jax.train` and `meg_jax.evaluate`: a config file and overrides.

    --config FILE[:VARIANT]     a Python file whose `get_config(variant)` returns a dict-like
    --config.a.b=VALUE          any field of `PipelineConfig`, whether or not the file sets it
    --verbosity N               0: the project's own lines; 1: also framework INFO logs

The file's values are laid over the dataclass defaults, so every documented field can be set
from the command line; an unknown key (in the file or an override) is answered with the valid
keys at that level. Values are parsed to the type of the field's default (bool: true/false/1/0;
dicts, lists and tuples as Python literals).
"""

import ast
import dataclasses
import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Any

from meg_jax.infra.distributed import initialize_if_multiprocess, is_main_process
from meg_jax.pipeline.config import PipelineConfig, pipeline_config


class ConfigError(ValueError):
    """A config file or override the project cannot use; the message says what and where."""


def _plain(value: Any) -> Any:
    return value.to_dict() if hasattr(value, "to_dict") else value


def _read_file(spec: str) -> dict:
    path, _, variant = spec.partition(":")
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--config {spec}: no such file {file}")
    module_spec = importlib.util.spec_from_file_location(f"_meg_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:  # the user's file: say which one failed and how
        raise ConfigError(
            f"{file}: the config file failed to load ({type(err).__name__}: {err})"
        ) from err
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{file}: a config file must define get_config(variant)")
    try:
        return _plain(module.get_config(variant or None))
    except ValueError as err:
        raise ConfigError(f"{file}: {err}") from None


def _merge(base: dict, over: dict, where: str) -> dict:
    out = dict(base)
    for key, value in over.items():
        if key not in base:
            raise ConfigError(
                f"{where}: unknown config key {key!r}; expected one of {sorted(base)}"
            )
        value = _plain(value)
        if isinstance(base[key], dict) and isinstance(value, dict) and base[key]:
            out[key] = _merge(base[key], value, f"{where}.{key}")
        else:
            out[key] = value
    return out


def _parse(text: str, default: Any, key: str) -> Any:
    if isinstance(default, bool):
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ConfigError(f"--config.{key}: expected true or false, got {text!r}")
    if isinstance(default, int | float) and not isinstance(default, bool):
        try:
            return type(default)(text) if isinstance(default, float) else int(text)
        except ValueError:
            raise ConfigError(
                f"--config.{key}: expected a {type(default).__name__}, got {text!r}"
            ) from None
    if isinstance(default, dict | list | tuple):
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ConfigError(f"--config.{key}: expected a Python literal, got {text!r}") from None
    return text


def _override(tree: dict, dotted: str, text: str) -> None:
    node, parts = tree, dotted.split(".")
    for i, part in enumerate(parts):
        where = "config" + "".join(f".{p}" for p in parts[:i])
        if not isinstance(node, dict) or part not in node:
            known = sorted(node) if isinstance(node, dict) else []
            raise ConfigError(
                f"--config.{dotted}: {where} has no key {part!r}; expected one of {known}"
            )
        if i == len(parts) - 1:
            node[part] = _parse(text, node[part], dotted)
        else:
            node = node[part]


def parse_args(argv: list[str]) -> tuple[str, list[tuple[str, str]], int]:
    """(config file spec, [(dotted key, value)], verbosity) from command-line arguments."""
    spec, overrides, verbosity = None, [], 0
    args = list(argv)
    while args:
        arg = args.pop(0)
        name, eq, value = arg.partition("=")
        if name in ("--config", "--verbosity") and not eq:
            if not args:
                raise ConfigError(f"{name} needs a value")
            value = args.pop(0)
        if name == "--config":
            spec = value
        elif name == "--verbosity":
            verbosity = int(value)
        elif name.startswith("--config."):
            if not eq:
                raise ConfigError(f"{arg}: expected --config.KEY=VALUE")
            overrides.append((name[len("--config.") :], value))
        else:
            raise ConfigError(
                f"unexpected argument {arg!r}; see the module docstring of {__name__}"
            )
    if spec is None:
        raise ConfigError("--config FILE is required (e.g. --config configs/smollm2_cf.py)")
    return spec, overrides, verbosity


def load_config(argv: list[str]) -> tuple[PipelineConfig, int]:
    """(the validated config, verbosity) of a command line (module docstring)."""
    spec, overrides, verbosity = parse_args(argv)
    tree = _merge(dataclasses.asdict(PipelineConfig()), _read_file(spec), spec.partition(":")[0])
    for key, value in overrides:
        _override(tree, key, value)
    try:
        return pipeline_config(tree), verbosity
    except (ValueError, TypeError) as err:
        raise ConfigError(str(err)) from None


def setup_logging(verbosity: int) -> None:
    """The project's lines on stdout; framework INFO records (orbax, absl) only when asked."""
    logging.basicConfig(
        level=logging.INFO if verbosity > 0 else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s" if verbosity > 0 else "%(message)s",
        stream=sys.stdout,
        force=True,  # imports (absl) may have configured the root logger already
    )
    # One line per stage (the pipeline's); the stages' own INFO lines only when asked.
    logging.getLogger("meg_jax").setLevel(logging.INFO if verbosity > 0 else logging.WARNING)
    logging.getLogger("meg_jax.pipeline").setLevel(logging.INFO)
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.INFO if verbosity > 0 else absl_logging.WARNING)
    except ImportError:
        pass


def user_errors() -> tuple[type[BaseException], ...]:
    """The errors that describe bad input or a state to act on, each with a message saying what
    and where: the command line prints the message alone, not a traceback."""
    from meg_jax.checkpoints.errors import CheckpointError
    from meg_jax.collect.bank import BankError
    from meg_jax.data.download import DatasetUnavailableError
    from meg_jax.data.records import DataFormatError
    from meg_jax.diffusion.train import NonFiniteTrainingError
    from meg_jax.evaluation.evaluator import EmptyLabelsError
    from meg_jax.infra.fingerprint import StageInputsChanged
    from meg_jax.infra.runs import RestoreError
    from meg_jax.pipeline.context import StageNotReady

    return (
        BankError,
        CheckpointError,
        DatasetUnavailableError,
        DataFormatError,
        NonFiniteTrainingError,
        EmptyLabelsError,
        StageInputsChanged,
        RestoreError,
        StageNotReady,
        FileNotFoundError,
    )


def main(argv: list[str], action) -> int:
    """Parses `argv`, then calls `action(cfg)`. A configuration error exits 2 and a user error
    (bad input, changed inputs, diverged training) exits 1, each with one line; `--verbosity`
    above 0 shows the traceback too."""
    initialize_if_multiprocess()  # first: jax.distributed must start before any device use
    if not is_main_process():
        # Every process computes the same lines and tables: process 0 alone prints them and
        # draws progress bars; the others keep stderr for their warnings and errors.
        os.environ["TQDM_DISABLE"] = "1"
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
    try:
        cfg, verbosity = load_config(argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    setup_logging(verbosity)
    try:
        action(cfg)
    except user_errors() as err:
        if verbosity > 0:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
