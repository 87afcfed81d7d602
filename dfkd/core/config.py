"""Experiment configs: YAML files with ``_base_`` inheritance and dotted command-line overrides,
validated into the typed dataclasses of :mod:`dfkd.core.schema` (:mod:`dfkd.core.validate`).

Every key is traced back to the file (or the command line) that set it, so a validation
error names both the key and where it came from::

    dfkd: error: teacher/lenet5-fmnist.yaml: unknown key 'optim.lrr' (did you mean 'lr'?)

Named configs ship inside the package (``dfkd/configs/<group>/<name>.yaml``) so that
``--config teacher/lenet5-fmnist`` works after a pip install.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import yaml

from dfkd.core.schema import Config
from dfkd.core.validate import config_from_dict
from dfkd_base.errors import ConfigError
from dfkd_base.registry import nearest

CONFIG_DIR = Path(__file__).parent.parent / "configs"
COMMAND_LINE = "command line"


def named_configs() -> list[str]:
    """Names of the configs shipped with the package, e.g. ``teacher/lenet5-fmnist``."""
    return sorted(
        p.relative_to(CONFIG_DIR).with_suffix("").as_posix()
        for p in CONFIG_DIR.rglob("*.yaml")
        if not p.name.startswith("_") and not any(part.startswith("_") for part in p.relative_to(CONFIG_DIR).parts)
    )


def resolve_config_path(name: str, relative_to: Path | None = None) -> Path:
    """A config file path from a path or a shipped name (with or without ``.yaml``)."""
    candidates = []
    if relative_to is not None:
        candidates.append(relative_to / name)
    candidates += [Path(name), CONFIG_DIR / name]
    for base in list(candidates):
        candidates.append(base.with_name(base.name + ".yaml"))
    for path in candidates:
        if path.is_file():
            return path
    close = nearest(name, named_configs())
    hint = f"; did you mean {', '.join(close)}?" if close else f"; shipped configs: {', '.join(named_configs())}"
    raise ConfigError(f"config '{name}' not found (neither a file nor a shipped config){hint}")


def _display(path: Path) -> str:
    try:
        return path.resolve().relative_to(CONFIG_DIR.resolve()).as_posix()
    except ValueError:
        return str(path)


# A config is a few hundred values; YAML aliases share one value between places, and what is built
# from a config (merges, overrides, dataclasses) expands every place: more than this many, counted
# with aliases expanded, is refused (a "billion laughs" config would otherwise exhaust memory).
MAX_CONFIG_VALUES = 100_000
MAX_CONFIG_BYTES = 1 << 20


def bounded(data: Any, where: str) -> Any:
    """``data`` as YAML read it, checked to hold at most :data:`MAX_CONFIG_VALUES` values with its
    aliases expanded, and no alias that refers to a value holding it."""
    count, inside = 0, set()

    def walk(x: Any) -> None:
        nonlocal count
        count += 1
        if count > MAX_CONFIG_VALUES:
            raise ConfigError(f"{where}: more than {MAX_CONFIG_VALUES:,} values once its YAML aliases are expanded")
        if isinstance(x, (dict, list)):
            if id(x) in inside:
                raise ConfigError(f"{where}: a YAML alias refers to a value that holds it (a cycle)")
            inside.add(id(x))
            for v in x.values() if isinstance(x, dict) else x:
                walk(v)
            inside.discard(id(x))

    try:
        walk(data)
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply") from None
    return data


def _read_yaml(path: Path) -> dict:
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{_display(path)}: {path.stat().st_size:,} bytes is not a config (at most "
                              f"{MAX_CONFIG_BYTES:,})")
        data = bounded(yaml.safe_load(path.read_text()), _display(path))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{_display(path)}:{where} invalid YAML: {getattr(exc, 'problem', exc)}") from None
    except (UnicodeDecodeError, RecursionError):
        raise ConfigError(f"{_display(path)}: not a readable YAML text file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{_display(path)}: a config must be a mapping at the top level, got {type(data).__name__}")
    return data


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key → leaf value; list items are addressed by index (``phases.0.steps``)."""
    out: dict[str, Any] = {}
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else None
    if items is None or not data:
        return {prefix: data} if prefix else {}
    for key, value in items:
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _merge(base: dict, child: dict) -> dict:
    """Deep merge; the child wins. Lists are replaced, not merged (a phase list is a unit)."""
    out = copy.deepcopy(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and not value.pop("_replace_", False):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _load_file(path: Path, origin: dict[str, str], chain: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in chain:
        raise ConfigError(f"{_display(path)}: _base_ cycle: {' -> '.join(_display(p) for p in (*chain, path))}")
    data = _read_yaml(path)
    bases = data.pop("_base_", [])
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(f"{_display(path)}: _base_ must name configs (a name or a list of names), got {bases!r}")
    merged: dict = {}
    for base in bases:
        merged = _merge(merged, _load_file(resolve_config_path(base, path.parent), origin, (*chain, path)))
    for key in flatten(data):
        origin[key] = _display(path)
    return _merge(merged, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``optim.lr=0.05`` → (["optim", "lr"], 0.05); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}' is not of the form key.path=value")
    try:
        value = bounded(yaml.safe_load(raw), f"override '{key.strip()}'") if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # a plain string that YAML can't read, e.g. "a: b"
    return key.strip().split("."), value


def _set_dotted(data: dict, keys: list[str], value: Any, text: str) -> None:
    node: Any = data
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"override '{text}': '{'.'.join(keys[:i])}' has {len(node)} items, no index {key}")
            key = int(key)
        elif not isinstance(node, dict):
            raise ConfigError(f"override '{text}': '{'.'.join(keys[:i])}' is not a mapping")
        if last:
            node[key] = value
        else:
            if isinstance(node, dict) and node.get(key) is None:
                node[key] = {}
            node = node[key]


def load_config_dict(name: str, overrides: list[str] = ()) -> tuple[dict, dict[str, str]]:
    """The merged raw config and the origin (file or command line) of every dotted key."""
    origin: dict[str, str] = {}
    data = _load_file(resolve_config_path(name), origin)
    for text in overrides:
        keys, value = parse_override(text)
        _set_dotted(data, keys, value, text)
        for key in flatten(value, ".".join(keys)) or {".".join(keys): None}:
            origin[key] = COMMAND_LINE
    return data, origin


def load_config(name: str, overrides: list[str] = ()) -> Config:
    data, origin = load_config_dict(name, overrides)
    return config_from_dict(data, origin, default_origin=_display(resolve_config_path(name)))


def config_to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)
