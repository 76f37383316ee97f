"""The one config loader (atlas_server/tomlconfig.py), atomic writes (atlas_server/io.py) and
the home folder (atlas_server/paths.py): every config behaves alike, every write is whole."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Literal

import msgspec
import pytest
import torch
from safetensors.torch import load_file

from atlas_server import io, paths, tomlconfig
from atlas_server.config import ConfigFileError, load_config
from atlas_server.model import ConfigError, load_preset
from eval_suites.config import load_suite_config
from eval_suites.errors import SuiteConfigError
from eval_suites.suites.perplexity import PerplexityConfig
from trainer.config import TrainConfigError, load_train_config

ROOT = Path(__file__).resolve().parent.parent


class Inner(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    size: int = 1
    kind: Literal["a", "b"] = "a"
    names: list[str] = []


class Outer(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    inner: Inner = Inner()
    extra: dict[str, int] = {}
    rate: float = 0.5


@dataclasses.dataclass(frozen=True)
class Flat:
    window: int
    ratio: float
    tags: tuple[str, ...]


def test_set_values_are_toml_literals_and_bare_words_are_strings():
    assert tomlconfig.parse_set("a.b=3e-4") == ("a.b", 3e-4)
    assert tomlconfig.parse_set("x=[1, 2]") == ("x", [1, 2])
    assert tomlconfig.parse_set("x=true") == ("x", True)
    assert tomlconfig.parse_set("out=runs/x") == ("out", "runs/x")
    assert tomlconfig.parse_set("t={k = 1}") == ("t", {"k": 1})
    for bad in ("novalue", "=3", "a..b=1"):
        with pytest.raises(ValueError, match="key=value"):
            tomlconfig.parse_set(bad)


def test_a_bare_date_or_number_for_a_string_says_to_quote_it():
    """QA: `--set run.out_dir=2024-06-01` said "must be str, got datetime.date(2024, 6, 1)":
    a Python repr, and no word of the quoting that fixes it."""
    for word, kind in (("2024-06-01", "date"), ("42", "int")):
        with pytest.raises(TrainConfigError) as e:
            load_train_config(None, [f"run.out_dir={word}"])
        assert str(e.value) == (
            f"--set: field 'run.out_dir' must be a string; '{word}' was read as a TOML {kind}:"
            f" quote it (--set run.out_dir='\"{word}\"')"
        )
    assert load_train_config(None, ['run.out_dir="2024-06-01"']).run.out_dir == "2024-06-01"


def test_layers_merge_in_order_and_tables_merge_key_by_key(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("rate = 1\n[inner]\nsize = 2\n[extra]\nx = 1\n")
    layers = [
        tomlconfig.file_layer(path),
        tomlconfig.set_layer(["inner.kind=b", "extra.y=2", "inner.size=5"]),
    ]
    cfg = tomlconfig.decode(Outer, layers)
    assert cfg == Outer(inner=Inner(size=5, kind="b"), extra={"x": 1, "y": 2}, rate=1.0)


def test_unknown_keys_name_the_key_and_the_layer_that_brought_it(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[inner]\nsise = 2\n")
    known = r"known fields of \[inner\]: kind, names, size"
    with pytest.raises(ValueError, match=rf"c\.toml: unknown field 'inner\.sise'; {known}"):
        tomlconfig.decode(Outer, [tomlconfig.file_layer(path)])
    with pytest.raises(ValueError, match=r"^--set: unknown field 'colour'"):
        tomlconfig.decode(Outer, [("c.toml", {}), tomlconfig.set_layer(["colour=red"])])


def test_wrong_types_name_the_field_what_it_must_be_and_the_layer(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[inner]\nsize = 2\n")
    cases = [
        (["inner.size='big'"], r"^--set: field 'inner\.size' must be int, got 'big'$"),
        (["inner.kind=c"], r"field 'inner\.kind' must be one of 'a', 'b', got 'c'"),
        (["inner.names=['x', 3]"], r"field 'inner\.names' item 1 must be str, got 3"),
        (["inner=3"], r"field 'inner' must be a table, got 3"),
        (["rate=true"], r"field 'rate' must be float, got True"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            tomlconfig.decode(Outer, [tomlconfig.file_layer(path), tomlconfig.set_layer(options)])
    path.write_text("[inner]\nsize = 'two'\n")
    with pytest.raises(ValueError, match=r"c\.toml: field 'inner\.size' must be int"):
        tomlconfig.decode(Outer, [tomlconfig.file_layer(path), tomlconfig.set_layer(["rate=1"])])


def test_dataclasses_decode_like_structs_with_the_callers_error_and_noun():
    layers = [("defaults", {"window": 4, "ratio": 1, "tags": ["a"]})]
    assert tomlconfig.decode(Flat, layers) == Flat(4, 1.0, ("a",))
    with pytest.raises(KeyError, match="no value for thing 'tags'"):
        tomlconfig.decode(Flat, [("d", {"window": 4, "ratio": 1.0})], KeyError, what="thing")
    with pytest.raises(KeyError, match="unknown thing 'windw'"):
        tomlconfig.decode(Flat, [*layers, ("--set", {"windw": 3})], KeyError, what="thing")


def test_missing_and_malformed_files_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="config file .*nope.toml does not exist"):
        tomlconfig.read_toml(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("[x\n")
    with pytest.raises(ValueError, match="bad.toml is not valid TOML"):
        tomlconfig.read_toml(tmp_path / "bad.toml")


@pytest.mark.parametrize(
    ("load", "error"),
    [
        (lambda p, s: load_config(p, s), ConfigFileError),
        (lambda p, s: load_train_config(p, s), TrainConfigError),
    ],
    ids=["server", "trainer"],
)
def test_server_and_trainer_configs_behave_alike(tmp_path, load, error):
    """The same mistakes give the same kind of message from both configs."""
    unknown = tmp_path / "u.toml"
    unknown.write_text("[nosuch]\nx = 1\n")
    with pytest.raises(error, match=r"u\.toml: unknown field 'nosuch'"):
        load(unknown, [])
    with pytest.raises(error, match=r"^--set: unknown field 'nosuch'"):
        load(None, ["nosuch.x=1"])
    section = "http" if error is ConfigFileError else "run"
    key = "port" if error is ConfigFileError else "seed"
    with pytest.raises(error, match=rf"--set: field '{section}\.{key}' must be int, got 'x'"):
        load(None, [f"{section}.{key}='x'"])


def test_model_presets_and_eval_suites_use_the_same_rules():
    with pytest.raises(ConfigError, match="overrides: unknown model config key 'n_expertz'"):
        load_preset("gpt2-tiny", n_expertz=2)
    with pytest.raises(ConfigError, match="model config key 'd_model' must be int, got '64'"):
        load_preset("gpt2-tiny", d_model="64")
    with pytest.raises(ConfigError, match="not divisible"):  # the struct's own check, unchanged
        load_preset("gpt2-tiny", d_model=63)
    with pytest.raises(SuiteConfigError, match="--set: perplexity option 'stride' must be int"):
        load_suite_config("perplexity", PerplexityConfig, overrides=["stride=1.5"])


# --- atomic writes -------------------------------------------------------------------------
def test_atomic_writes_replace_whole_files_and_leave_no_temporaries(tmp_path):
    target = tmp_path / "sub" / "f.json"
    io.atomic_write_json(target, {"a": 1})
    io.atomic_write_json(target, {"a": [1, 2]}, indent=2)
    assert json.loads(target.read_text()) == {"a": [1, 2]}
    io.atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    w = torch.arange(6.0).view(2, 3).t()  # not contiguous: saved as a contiguous copy
    io.save_safetensors(tmp_path / "t.safetensors", {"w": w}, {"k": "v"})
    assert torch.equal(load_file(tmp_path / "t.safetensors")["w"], w)
    with pytest.raises(ValueError):
        io.atomic_write_json(target, {"nan": float("nan")})  # not JSON: refused, old file kept
    assert json.loads(target.read_text()) == {"a": [1, 2]}
    assert sorted(p.name for p in tmp_path.rglob("*.tmp")) == []


def test_an_atomic_directory_replaces_the_folder_whole_or_not_at_all(tmp_path):
    target = tmp_path / "ckpt"
    with io.atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), io.atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("crash while writing")
    assert [p.name for p in target.iterdir()] == ["a.txt"] and (
        target / "a.txt"
    ).read_text() == "old"
    with io.atomic_directory(target) as tmp:
        (tmp / "b.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["b.txt"]  # replaced whole, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporaries left


def test_a_write_killed_midway_leaves_the_old_file(tmp_path):
    target = tmp_path / "state.txt"
    io.atomic_write_text(target, "old")
    script = (
        "import os, sys, signal\n"
        "from atlas_server import io\n"
        "os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)\n"
        "io.atomic_write_text(sys.argv[1], 'new' * 1000)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(target)], cwd=ROOT)
    assert proc.returncode == -9
    assert target.read_text() == "old"


def test_the_tokenizer_imports_nothing_else_of_atlas():
    """docs/architecture.md: the tokenizer room stands alone (it keeps its own atomic write)."""
    for source in (ROOT / "atlas_server" / "tokenizer").glob("*.py"):
        text = source.read_text()
        assert "from atlas_server" not in text and "from .." not in text, source.name


def test_atlas_home_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ATLAS_HOME", str(tmp_path))
    assert paths.quickstart_dir() == tmp_path / "quickstart"
    monkeypatch.delenv("ATLAS_HOME")
    assert paths.atlas_home() == Path(os.path.expanduser("~")) / ".cache" / "atlas"


def test_serve_takes_set_options_like_the_other_commands(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "atlas_server.cli", "serve", "--checkpoint", str(tmp_path),
         "--set", "engine.max_slots=4"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode != 0 and "Traceback" not in r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith(
        "error: --set: unknown field 'engine.max_slots'; known fields of [engine]"
    )
    assert "max_running" in line
