"""Suite configuration: TOML data decoded into frozen, validated dataclasses.

Defaults live in one place, `eval_suites/configs/<suite>.toml`. A run's config is that file,
then an optional user TOML (`--config FILE`), then `--set key=value` overrides, in that
order. Every layer is checked against the suite's dataclass: unknown keys and wrong types
are errors that name the key and the file. Values given with `--set` are parsed as TOML
literals (`--set window=128`, `--set 'concurrencies=[1,4]'`), falling back to a plain
string (`--set prompt_style=chat`). What it does not do: server or CLI options (base URL,
seed, limit), which are the same for every suite and live on the command line.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union

from .errors import SuiteConfigError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

__all__ = ["CONFIG_DIR", "load_suite_config", "parse_set_option"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
C = TypeVar("C")


def parse_set_option(option: str) -> tuple[str, Any]:
    """`key=value` -> (key, value) with the value read as a TOML literal when it is one."""
    key, sep, raw = option.partition("=")
    key = key.strip()
    if not sep or not key:
        raise SuiteConfigError(f"--set expects key=value, got {option!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SuiteConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise SuiteConfigError(f"{path} is not valid TOML: {e}") from None


def load_suite_config(
    suite: str,
    cls: type[C],
    user_file: Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> C:
    """Merge defaults, a user file and --set overrides into a validated `cls` instance."""
    values = read_toml(CONFIG_DIR / f"{suite}.toml")
    layers: list[tuple[str, dict[str, Any]]] = []
    if user_file is not None:
        layers.append((str(user_file), read_toml(user_file)))
    if overrides:
        layers.append(("--set", dict(parse_set_option(o) for o in overrides)))
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for origin, layer in layers:
        unknown = sorted(set(layer) - set(fields))
        if unknown:
            raise SuiteConfigError(
                f"{origin}: unknown {suite} option(s) {unknown}; known: {sorted(fields)}"
            )
        values.update(layer)
    missing = sorted(set(fields) - set(values))
    if missing:
        raise SuiteConfigError(f"{suite}: no value for {missing} (defaults file is incomplete)")
    hints = typing.get_type_hints(cls)
    checked = {name: coerce(suite, name, values[name], hints[name]) for name in fields}
    instance = cls(**checked)
    validate = getattr(instance, "validate", None)
    if validate is not None:
        validate()
    return instance


def coerce(suite: str, name: str, value: Any, annotation: Any) -> Any:
    """Check `value` against a simple annotation (scalars, lists, optionals); ints widen to float."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return coerce(suite, name, value, option)
            except SuiteConfigError:
                continue
        raise _type_error(suite, name, value, annotation)
    if annotation is type(None):
        if value is None or value == "none":
            return None
        raise _type_error(suite, name, value, annotation)
    if origin in (list, tuple):
        (item_type, *_rest) = typing.get_args(annotation) or (Any,)
        if not isinstance(value, list | tuple):
            raise _type_error(suite, name, value, annotation)
        return tuple(coerce(suite, name, item, item_type) for item in value)
    if annotation is Any:
        return value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is bool and not isinstance(value, bool):
        raise _type_error(suite, name, value, annotation)
    if annotation is int and isinstance(value, bool):
        raise _type_error(suite, name, value, annotation)
    if not isinstance(value, annotation):
        raise _type_error(suite, name, value, annotation)
    return value


def _type_error(suite: str, name: str, value: Any, annotation: Any) -> SuiteConfigError:
    wanted = getattr(annotation, "__name__", str(annotation))
    return SuiteConfigError(f"{suite} option {name!r} must be {wanted}, got {value!r}")
