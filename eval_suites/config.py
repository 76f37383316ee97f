"""Suite configuration: TOML data decoded into frozen, validated dataclasses.

Defaults live in one place, `eval_suites/configs/<suite>.toml`. A run's config is that file,
then an optional user TOML (`--config FILE`), then `--set key=value` overrides, in that
order, merged by Atlas's one config loader (`atlas_server.tomlconfig`). Every layer is checked
against the suite's dataclass: unknown keys and wrong types are errors that name the key and
the file. Values given with `--set` are parsed as TOML literals (`--set window=128`,
`--set 'concurrencies=[1,4]'`), falling back to a plain string (`--set prompt_style=chat`).
What it does not do: server or CLI options (base URL, seed, limit), which are the same for
every suite and live on the command line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from atlas_server import tomlconfig

from .errors import SuiteConfigError

__all__ = ["CONFIG_DIR", "load_suite_config", "parse_set_option"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
C = TypeVar("C")


def parse_set_option(option: str) -> tuple[str, Any]:
    """`key=value` -> (key, value) with the value read as a TOML literal when it is one."""
    return tomlconfig.parse_set(option, SuiteConfigError)


def read_toml(path: Path) -> dict[str, Any]:
    return tomlconfig.read_toml(path, SuiteConfigError)


def load_suite_config(
    suite: str,
    cls: type[C],
    user_file: Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> C:
    """Merge defaults, a user file and --set overrides into a validated `cls` instance."""
    layers = [tomlconfig.file_layer(CONFIG_DIR / f"{suite}.toml", SuiteConfigError)]
    if user_file is not None:
        layers.append(tomlconfig.file_layer(user_file, SuiteConfigError))
    layers.append(tomlconfig.set_layer(overrides, SuiteConfigError))
    instance = tomlconfig.decode(cls, layers, SuiteConfigError, what=f"{suite} option")
    validate = getattr(instance, "validate", None)
    if validate is not None:
        validate()
    return instance
