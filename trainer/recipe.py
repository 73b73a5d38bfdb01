"""Recipes and overrides read into checked values: YAML files, `section.key=value` text, and
the coercion of each value to its key's annotation. A bad one is a one-line ConfigError."""
from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A bad recipe or override; the message is one line naming the key or file."""


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def coerce(key: str, value: Any, hint: Any) -> Any:
    """Check one value against its annotation; ints widen to float, lists become tuples."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        args = typing.get_args(hint)
        check(isinstance(value, (list, tuple)), f"config: {key} must be a list, got {value!r}")
        item_types = args[:-1] * len(value) if args[-1:] == (Ellipsis,) else args
        check(len(value) == len(item_types), f"config: {key} must have {len(item_types)} items, got {len(value)}")
        return tuple(coerce(f"{key}[{i}]", v, t) for i, (v, t) in enumerate(zip(value, item_types)))
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        check(ok, f"config: {key} must be a number, got {value!r}")
        return float(value)
    if hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        check(ok, f"config: {key} must be an integer, got {value!r}")
        return value
    if hint is bool:
        check(isinstance(value, bool), f"config: {key} must be true or false, got {value!r}")
        return value
    if hint is str:
        check(isinstance(value, str), f"config: {key} must be a string, got {value!r}")
        return value
    raise TypeError(f"config: no rule for the type of {key}: {hint}")


def resolve_recipe(recipe: str) -> Path:
    """A recipe is a YAML path, or the name of one in configs/ ('tiny_cpu')."""
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml"):
        check(path.is_file(), f"config: {path}: no such file")
        return path
    named = CONFIG_DIR / f"{recipe}.yaml"
    if not named.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"config: unknown recipe '{recipe}'; known: {', '.join(known)}")
    return named


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config: {path}:{where} is not valid YAML") from None
    raw = {} if raw is None else raw
    check(isinstance(raw, dict), f"config: {path} must be a mapping of sections")
    return raw


def parse_override(text: str) -> tuple[str, str, Any]:
    check("=" in text, f"config: override '{text}' must look like section.key=value")
    dotted, value = text.split("=", 1)
    parts = dotted.strip().split(".")
    check(len(parts) == 2 and all(parts), f"config: override '{text}' must look like section.key=value")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        raise ConfigError(f"config: override {dotted}: cannot parse value {value!r}") from None
    return parts[0], parts[1], parsed
