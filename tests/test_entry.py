"""The console scripts start through atlas_server.entry: a Ctrl-C while a CLI is still
importing PyTorch is one line and exit status 130, not a traceback."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from atlas_server import entry
from atlas_server.tomlconfig import parse_toml

ROOT = Path(__file__).resolve().parent.parent


def scripts() -> dict[str, str]:
    return parse_toml((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def test_every_console_script_starts_through_the_entry_module():
    targets = scripts()
    assert set(targets) == {"atlas", "atlas-train", "atlas-eval"}
    for name, target in targets.items():
        module, function = target.split(":")
        assert module == "atlas_server.entry", name
        assert callable(getattr(entry, function)), name


@pytest.mark.parametrize("script", ["atlas", "atlas-train", "atlas-eval"])
def test_a_ctrl_c_during_the_cli_import_is_one_line_and_status_130(script, monkeypatch, capsys):
    def interrupted_import(name, *args, **kwargs):
        raise KeyboardInterrupt  # what a Ctrl-C inside `import torch` raises

    monkeypatch.setattr(importlib, "import_module", interrupted_import)
    start = getattr(entry, scripts()[script].split(":")[1])
    with pytest.raises(SystemExit) as stopped:
        start()
    assert stopped.value.code == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_the_entry_points_run_their_cli(monkeypatch):
    called = []
    for module in ("atlas_server.cli", "trainer.cli", "eval_suites.cli"):
        monkeypatch.setattr(
            importlib.import_module(module), "main", lambda m=module: called.append(m)
        )
    entry.atlas(), entry.atlas_train(), entry.atlas_eval()
    assert called == ["atlas_server.cli", "trainer.cli", "eval_suites.cli"]


@pytest.mark.parametrize(
    ("script", "args", "says"),
    [
        ("atlas", ["tokenizer", "train", "x", "--vocab-size", "300"], "Missing option '--output'"),
        ("atlas", ["tokenizer", "decode", "-t", "x", "72", "-5"], "No such option: -5"),
        ("atlas-train", ["--bogus"], "No such option: --bogus"),
        ("atlas-eval", ["run", "perplexity", "--limit", "abc"], "Invalid value for '--limit'"),
    ],
)
def test_a_usage_error_is_one_line_naming_the_help_to_read(script, args, says):
    """Click's usage errors were a boxed usage panel and help text (found by two QA passes);
    they are one `error:` line naming the option and the --help to read, exit status 2."""
    import subprocess
    import sys

    code = f"import sys; sys.argv = ['{script}', *sys.argv[1:]]; from atlas_server import entry; "
    code += f"entry.{scripts()[script].split(':')[1]}()"
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)  # fmt: skip
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ") and says in lines[0] and "--help`)" in lines[0]
