"""The one TOML config loader: files and `--set` options decoded into frozen, typed structs.

What it does: reads TOML files (a missing file or bad TOML is an error naming the file),
turns `--set key=value` options into a layer (dotted keys reach into sections; the value
is read as a TOML literal, `--set optim.lr=3e-4`, `--set 'tasks=["a"]'`, and a bare word
that is not one is a string, `--set run.out_dir=runs/x`), checks every layer against the
target type, a msgspec `Struct` or a dataclass with nested sections of either: an unknown
key is an error that names the key and the file or option that brought it. Then it merges
the layers in order (later ones win, tables merge key by key) and converts the result
with msgspec: a value of the wrong type is an error naming the field, what it must be, and
where the value came from. Every Atlas config (server, trainer, eval suites, model
presets) loads through `decode`, each with its own exception class, so they behave alike.

What it does not do: checks across fields (each config's own `validate()`), defaults
(they live on the struct), or writing TOML.

A leaf: it imports nothing of Atlas, so any room may use it (see docs/architecture.md).
"""

from __future__ import annotations

import dataclasses
import datetime
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import msgspec

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

__all__ = ["Layer", "decode", "file_layer", "parse_set", "parse_toml", "read_toml", "set_layer"]

T = TypeVar("T")
Layer = tuple[str, Mapping[str, Any]]  # (where the values came from, the values)
SET_ORIGIN = "--set"


def parse_toml(text: str) -> dict[str, Any]:
    """The table of TOML text (tomllib, or tomli on Python 3.10)."""
    return tomllib.loads(text)


def read_toml(path: str | Path, error: type[Exception] = ValueError) -> dict[str, Any]:
    """The table of a TOML file; `error` names the file when it is missing or not TOML."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise error(f"config file {path} is a folder, not a TOML file") from None
    except UnicodeDecodeError as e:
        raise error(f"{path} is not UTF-8 text: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise error(f"{path} is not valid TOML: {e}") from None


def file_layer(path: str | Path, error: type[Exception] = ValueError) -> Layer:
    return str(path), read_toml(path, error)


def parse_set(option: str, error: type[Exception] = ValueError) -> tuple[str, Any]:
    """`key=value` -> (key, value), the value read as a TOML literal when it is one."""
    key, sep, raw = option.partition("=")
    key = key.strip()
    if not sep or not key or any(not part.strip() for part in key.split(".")):
        raise error(f"--set expects key=value (key may be dotted: section.key), got {option!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word is a string: --set run.out_dir=runs/x
    return key, value


def set_layer(options: Iterable[str], error: type[Exception] = ValueError) -> Layer:
    """The layer of several `--set` options; dotted keys become nested tables."""
    values: dict[str, Any] = {}
    for option in options:
        key, value = parse_set(option, error)
        *sections, last = [part.strip() for part in key.split(".")]
        target = values
        for name in sections:
            target = target.setdefault(name, {})
            if not isinstance(target, dict):
                raise error(f"--set {option}: {name} was given a value, it cannot be a section")
        target[last] = value
    return SET_ORIGIN, values


def decode(
    cls: type[T], layers: Sequence[Layer], error: type[Exception] = ValueError, what: str = "field"
) -> T:
    """Check each layer, merge them in order and convert the result into `cls`.

    `what` names a key in messages ("field", "perplexity option"). An error the struct's
    own `__post_init__` raises as `error` reaches the caller unchanged.
    """
    merged: dict[str, Any] = {}
    for origin, values in layers:
        _check_known(cls, values, origin, error, what, prefix="")
        _merge(merged, values)
    try:
        return msgspec.convert(merged, cls)
    except msgspec.ValidationError as e:
        if isinstance(e.__context__, error):  # raised by the struct's own checks
            raise e.__context__ from None
        raise error(_type_message(cls, layers, merged, str(e), what)) from None


# --- unknown keys --------------------------------------------------------------------------
def _fields(cls: Any) -> dict[str, Any] | None:
    """Field name -> annotation of a Struct or dataclass type; None for anything else."""
    if isinstance(cls, type) and issubclass(cls, msgspec.Struct):
        hints = typing.get_type_hints(cls)
        return {name: hints[name] for name in cls.__struct_fields__}
    if isinstance(cls, type) and dataclasses.is_dataclass(cls):
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    return None


def _section_type(annotation: Any) -> Any:
    """The struct a value must be for this annotation (`Section | None` included), or None."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        found = [_section_type(a) for a in typing.get_args(annotation)]
        found = [f for f in found if f is not None]
        return found[0] if len(found) == 1 else None
    return annotation if _fields(annotation) is not None else None


def _check_known(
    cls: Any, values: Mapping[str, Any], origin: str, error: type[Exception], what: str, prefix: str
) -> None:
    fields = _fields(cls)
    if fields is None:
        return
    unknown = [k for k in values if k not in fields]
    if unknown:
        names = ", ".join(repr(prefix + k) for k in unknown)
        plural = "s" if len(unknown) > 1 else ""
        where = f" of [{prefix[:-1]}]" if prefix else ""
        raise error(
            f"{origin}: unknown {what}{plural} {names}; known {what}s{where}: "
            f"{', '.join(sorted(fields))}"
        )
    for key, value in values.items():
        section = _section_type(fields[key])
        if section is not None and isinstance(value, Mapping):
            _check_known(section, value, origin, error, what, prefix=f"{prefix}{key}.")


def _merge(into: dict[str, Any], values: Mapping[str, Any]) -> None:
    for key, value in values.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = dict(value) if isinstance(value, Mapping) else value


# --- wrong types ---------------------------------------------------------------------------
_AT = re.compile(r"^(?P<detail>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_STEP = re.compile(r"\.([^.\[]+)|\[(\d+)\]")


def _type_message(
    cls: Any, layers: Sequence[Layer], merged: dict[str, Any], raw: str, what: str
) -> str:
    match = _AT.match(raw)
    detail, path = match.group("detail"), match.group("path") or ""
    steps = [name if name else int(index) for name, index in _STEP.findall(path)]
    missing = re.match(r"Object missing required field `([^`]+)`", detail)
    if missing:
        name = ".".join(str(s) for s in [*steps, missing.group(1)])
        return f"no value for {what} {name!r} (and no default)"
    keys = [s for s in steps if isinstance(s, str)]
    name = ".".join(keys)
    items = "".join(f" item {s}" for s in steps if isinstance(s, int))
    origin = next((o for o, v in reversed(layers) if _lookup(v, keys) is not _MISSING), "config")
    value = _lookup(merged, steps)
    annotation = _annotation(cls, steps)
    if detail.startswith(("Expected", "Invalid enum value")) and annotation is not None:
        wanted = _describe(annotation)
        bare = isinstance(value, (datetime.date, datetime.time, int, float))
        if wanted == "str" and bare and not items:
            # TOML read a bare 2024-06-01 or 42 as a date or a number, not as a word.
            how = f" (--set {name}='\"{value}\"')" if origin == "--set" else ""
            return (
                f"{origin}: {what} {name!r}{items} must be a string; {str(value)!r} was read"
                f" as a TOML {type(value).__name__}: quote it{how}"
            )
        return f"{origin}: {what} {name!r}{items} must be {wanted}, got {value!r}"
    return f"{origin}: {what} {name!r}{items}: {detail}"


_MISSING = object()


def _lookup(values: Any, steps: Sequence[str | int]) -> Any:
    for step in steps:
        try:
            values = values[step]
        except (KeyError, IndexError, TypeError):
            return _MISSING
    return values


def _annotation(cls: Any, steps: Sequence[str | int]) -> Any:
    """The annotation at a path of field names and list indices, or None."""
    annotation = cls
    for step in steps:
        if isinstance(step, int):  # an item of a list
            items = [a for a in typing.get_args(_unwrap_optional(annotation)) if a is not Ellipsis]
            if len(items) != 1:
                return None
            annotation = items[0]
            continue
        fields = _fields(_section_type(annotation))
        if fields is None or step not in fields:
            return None
        annotation = fields[step]
    return annotation


def _unwrap_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        return options[0] if len(options) == 1 else annotation
    return annotation


def _describe(annotation: Any) -> str:
    """A reader's name for a type: int, a list of int, one of 'a', 'b', a table."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]  # TOML has no null
        return " or ".join(_describe(a) for a in options)
    if origin in (list, tuple, set, frozenset, Sequence):
        inner = [a for a in args if a is not Ellipsis]
        return f"a list of {_describe(inner[0])}" if inner else "a list"
    if origin in (dict, Mapping) or _fields(annotation) is not None or annotation is dict:
        return "a table"
    if annotation is bool:
        return "bool (true or false)"
    return getattr(annotation, "__name__", str(annotation))
