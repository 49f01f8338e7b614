"""Typed stage configs from ml_collections dicts, strict about unknown and mistyped keys.

Every stage keeps its settings in a frozen dataclass; the user's config file holds a
`ConfigDict` per stage. `dataclass_from_dict` is the one bridge between them, so a typo in a
config file (`lerning_rate`) is an error naming the key and the section, never a silent default.
"""

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def _to_plain(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return value


def dataclass_from_dict(cls: type[T], mapping: Mapping[str, Any] | None, where: str) -> T:
    """Builds dataclass `cls` from `mapping`; unknown keys raise a ValueError naming `where`.

    Nested dataclass fields are built recursively from nested mappings; tuples are converted from
    lists so the result stays hashable (configs are static arguments of jitted functions).
    """
    mapping = dict(_to_plain(mapping) or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(mapping) - set(fields))
    if unknown:
        raise ValueError(
            f"{where}: unknown config key(s) {unknown}; expected some of {sorted(fields)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in mapping.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
            value = dataclass_from_dict(hint, value, f"{where}.{name}")
        elif _is_tuple_hint(hint) and isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def _is_tuple_hint(hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_is_tuple_hint(arg) for arg in typing.get_args(hint))
    return hint is tuple or origin is tuple


def parse_arg(arg: str | None, **defaults):
    """A config file's variant string, `"smoke,n=64"` -> {smoke: True, n: 64}, over `defaults`.

    Values take the type of their default; an unknown key is an error naming the known ones.
    """
    import ml_collections

    out = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        if key not in defaults:
            raise ValueError(f"unknown config variant {key!r}; known: {sorted(defaults)}")
        if not value:
            out[key] = True
        elif isinstance(defaults[key], bool):
            out[key] = value.lower() in ("1", "true", "yes")
        else:
            out[key] = type(defaults[key])(value)
    return out


def load_sibling(config_file: str, name: str):
    """The module `name` beside `config_file` (a config file's shared tables, e.g. paper.py).

    Config files are loaded by path, not as a package, so they cannot import each other.
    """
    import importlib.util
    from pathlib import Path

    path = Path(config_file).with_name(name)
    spec = importlib.util.spec_from_file_location(f"_meg_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
