"""Generic loading of typed, frozen dataclass configs: YAML files plus `section.key=value` overrides.

A root config is a dataclass whose fields are sections (dataclasses, or scalars parsed by a section's `parse`
classmethod, e.g. a mesh "1,-1,4,2"). Keys and types are found by introspection, values are coerced to the
declared types, and every unknown key or bad value raises `ConfigError` naming the fix. The project's schema is
`lvm.config.Config`; the VQGAN's is `lvm.tokenizers.config.VQGANConfig`. This module imports neither jax nor
either schema.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration value that cannot work; the message says how to fix it."""


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def choice(name: str, value: str, choices: Sequence[str]) -> None:
    require(value in choices, f"{name}={value!r} is not supported; choose one of {tuple(choices)}")


def positive(section: str, obj: Any, names: Sequence[str]) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None:
            require(value > 0, f"{section}.{name}={value} must be positive")


def _sections(root: type) -> dict[str, type]:
    hints = typing.get_type_hints(root)
    return {f.name: hints[f.name] for f in dataclasses.fields(root)}


def _coerce(key: str, value: Any, kind: Any) -> Any:
    """`value` (from YAML or the command line) as type `kind`, or a ConfigError naming the key."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        return _coerce(key, value, next(a for a in args if a is not type(None)))
    if typing.get_origin(kind) is tuple:  # tuple[int, ...]: a YAML list or "1,2,4"
        items = value.split(",") if isinstance(value, str) else value
        if isinstance(items, int) and not isinstance(items, bool):
            items = [items]
        if isinstance(items, list | tuple):
            return tuple(_coerce(key, v.strip() if isinstance(v, str) else v, args[0]) for v in items)
    try:
        if kind is bool:
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            if isinstance(value, bool):
                return value
        elif kind is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, str):
                return int(value)
            if isinstance(value, float) and value.is_integer():
                return int(value)
        elif kind is float:
            if isinstance(value, int | float | str) and not isinstance(value, bool):
                return float(value)
        elif kind is str:
            if isinstance(value, str):
                return value
    except ValueError:
        pass
    name = getattr(kind, "__name__", str(kind))
    raise ConfigError(f"{key}={value!r} is not a valid {name}")


def _unknown(key: str, valid: Sequence[str]) -> ConfigError:
    leaf = lambda k: k.rpartition(".")[2]  # compare the key names, not the shared section prefix
    close = difflib.get_close_matches(leaf(key), [leaf(v) for v in valid], n=1)
    hint = f"did you mean {next(v for v in valid if leaf(v) == close[0])!r}? " if close else ""
    return ConfigError(f"unknown config key {key!r}; {hint}valid: {', '.join(valid)}")


def _build_section(name: str, cls: type, values: Any) -> Any:
    if isinstance(values, str) and hasattr(cls, "parse"):
        return cls.parse(values)
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise ConfigError(f"config section {name!r} must be a mapping of keys to values, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise _unknown(f"{name}.{key}", [f"{name}.{f}" for f in fields])
        kwargs[key] = _coerce(f"{name}.{key}", value, hints[key])
    return cls(**kwargs)


def from_dict(root: type, data: Mapping[str, Any]):
    """Build and validate a `root` config from nested sections (missing keys take defaults)."""
    sections = _sections(root)
    for name in data:
        if name not in sections:
            raise _unknown(name, list(sections))
    return root(**{name: _build_section(name, cls, data.get(name)) for name, cls in sections.items()})


def resolve_path(name: str | Path, config_dir: Path) -> Path:
    """A YAML path: an existing file, or a name like "model/tiny" under `config_dir`."""
    path = Path(name)
    if path.is_file():
        return path
    candidate = config_dir / (str(name) if str(name).endswith(".yaml") else f"{name}.yaml")
    if candidate.is_file():
        return candidate
    available = sorted(str(p.relative_to(config_dir).with_suffix("")) for p in config_dir.rglob("*.yaml"))
    raise FileNotFoundError(f"no config file {name!r}; pass a YAML path or one of: {', '.join(available)}")


def merge(base: dict, extra: Mapping) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _apply_override(root: type, data: dict, override: str) -> dict:
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {override!r} must look like section.key=value, e.g. model.n_layers=4")
    value = yaml.safe_load(text) if text.strip() else None
    sections = _sections(root)
    name, _, sub = key.partition(".")
    if name not in sections:
        raise _unknown(name, list(sections))
    if not sub:  # a whole section given as a scalar, e.g. mesh=1,-1,4,2
        return merge(data, {name: text.strip()})
    section = data.get(name)
    if isinstance(section, str):  # e.g. mesh given as "1,-1,4,2" in a file, then mesh.sp=2
        section = dataclasses.asdict(_build_section(name, sections[name], section))
    return merge(data, {name: merge(dict(section or {}), {sub: value})})


def load(root: type, files: Sequence[str | Path], overrides: Sequence[str], config_dir: Path):
    """Load YAML files (later ones win), apply `section.key=value` overrides, validate as `root`."""
    data: dict = {}
    for name in files:
        path = resolve_path(name, config_dir)
        data = merge(data, read_yaml(root, path))
    return load_data(root, data, overrides)


def parse_yaml(path: Path) -> Any:
    """A YAML file's content; a syntax error names the file."""
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err


def read_yaml(root: type, path: Path) -> dict:
    """One config file's sections, its syntax and key names checked (errors name the file)."""
    loaded = parse_yaml(path) or {}
    if not isinstance(loaded, Mapping):
        raise ConfigError(f"{path}: a config file must map section names to mappings")
    sections = _sections(root)
    for name, values in loaded.items():
        if name not in sections:
            raise ConfigError(f"{path}: {_unknown(name, list(sections))}")
        fields = [f.name for f in dataclasses.fields(sections[name])]
        for key in values if isinstance(values, Mapping) else ():
            if key not in fields:
                raise ConfigError(f"{path}: {_unknown(f'{name}.{key}', [f'{name}.{f}' for f in fields])}")
    return dict(loaded)


def load_data(root: type, data: Mapping[str, Any], overrides: Sequence[str] = ()):
    """Apply `section.key=value` overrides to nested sections `data` and validate as `root`."""
    data = dict(data)
    for override in overrides:
        data = _apply_override(root, data, override)
    return from_dict(root, data)
