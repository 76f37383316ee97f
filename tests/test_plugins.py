"""The plugin host: discovery, isolation of broken plugins, duplicates, documentation."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from atlas_server import hookspecs
from atlas_server.cli import app
from atlas_server.hookspecs import hookimpl
from atlas_server.plugins import PluginError, PluginHost

ROOT = Path(__file__).resolve().parent.parent


def test_builtins_are_discovered_through_entry_points():
    host = PluginHost()
    described = {p["name"]: p for p in host.describe()}
    assert described["atlas-retrievers"]["distribution"] == "atlas-llm"
    assert {"dense", "bm25", "hybrid", "hybrid-rrf"} <= set(host.retrievers)
    assert {"mmr", "query-likelihood", "cross-encoder"} <= set(host.rerankers)
    assert {
        "bleu",
        "chrf",
        "rouge",
        "exact_match",
        "token_f1",
        "recall_at_k",
        "mrr",
        "ndcg",
    } <= set(host.metrics)


def test_every_hook_is_documented():
    specs = [f for name, f in vars(hookspecs).items() if name.startswith("atlas_") and callable(f)]
    assert len(specs) >= 3
    for spec in specs:
        doc = inspect.getdoc(spec) or ""
        assert len(doc) > 120 and "register(" in doc, f"{spec.__name__} needs a full docstring"


def test_duplicate_names_are_refused_naming_both_plugins():
    class Other:
        @hookimpl
        def atlas_register_retrievers(self, register):
            register("dense", lambda ctx: None)

    host = PluginHost()
    with pytest.raises(PluginError, match=r"'dense'.*'atlas-retrievers'.*'my-dup-plugin'"):
        host.register(Other(), "my-dup-plugin")


def test_misspelled_hook_is_refused():
    class Typo:
        @hookimpl
        def atlas_register_retreivers(self, register):
            register("x", lambda ctx: None)

    with pytest.raises(PluginError, match=r"'typo-plugin' defines atlas_register_retreivers"):
        PluginHost().register(Typo(), "typo-plugin")

    class Undecorated:  # the host calls hooks by name, so it must see these too
        def atlas_register_retreivers(self, register):
            register("x", lambda ctx: None)

    with pytest.raises(PluginError, match=r"'undecorated'.*atlas_register_retreivers.*misspell"):
        PluginHost().register(Undecorated(), "undecorated")


def fake_distribution(tmp_path, monkeypatch, name: str, source: str):
    """An installed distribution (on sys.path) whose `atlas` entry point NAME is a module
    NAME_atlas_plugin with `source`."""
    module = f"{name}_atlas_plugin"
    dist = tmp_path / f"{module}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}-atlas-plugin\nVersion: 0.1\n"
    )
    (dist / "entry_points.txt").write_text(f"[atlas]\n{name} = {module}\n")
    (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.fixture
def broken_plugin_path(tmp_path, monkeypatch):
    """A fake installed distribution whose `atlas` entry point fails to import."""
    return fake_distribution(
        tmp_path, monkeypatch, "broken", "raise RuntimeError('boom at import')\n"
    )


def test_broken_plugin_is_reported_and_the_rest_load(broken_plugin_path):
    host = PluginHost()
    broken = next(p for p in host.describe() if p["name"] == "broken")
    assert "boom at import" in broken["error"]
    assert "dense" in host.retrievers  # the others still load
    with pytest.raises(PluginError, match="'broken'.*boom at import"):
        PluginHost(strict=True)


def test_atlas_plugins_command_lists_them(broken_plugin_path):
    result = CliRunner().invoke(app, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    rows = {p["name"]: p for p in json.loads(result.output)}
    assert rows["atlas-metrics"]["registered"]["metrics"][:2] == ["bleu", "chrf"]
    assert rows["broken"]["error"]
    strict = CliRunner().invoke(app, ["plugins", "--strict"])
    assert strict.exit_code == 1 and "boom at import" in strict.output


def test_a_hook_with_wrong_argument_names_is_reported_on_one_line(tmp_path, monkeypatch):
    """pluggy's PluginValidationError spans three lines; `atlas plugins` printed them
    unindented, as if they were three rows of its own."""
    source = (
        "from atlas_server.hookspecs import hookimpl\n\n"
        "@hookimpl\n"
        "def atlas_register_retrievers(registry):\n"
        "    pass\n"
    )
    fake_distribution(tmp_path, monkeypatch, "wrongargs", source)
    error = next(p for p in PluginHost().describe() if p["name"] == "wrongargs")["error"]
    assert "\n" not in error and "'registry'" in error and "hookspec" in error, error
    strict = CliRunner().invoke(app, ["plugins", "--strict"])
    assert strict.exit_code == 1 and len(strict.output.strip().splitlines()) == 1, strict.output
    assert "'registry'" in strict.output

    class Direct:
        @staticmethod
        def atlas_register_retrievers(registry):
            pass

    Direct.atlas_register_retrievers = hookimpl(Direct.atlas_register_retrievers)
    with pytest.raises(PluginError, match=r"'direct' cannot be registered: .*'registry'") as e:
        PluginHost(discover=False).register(Direct, "direct")
    assert "\n" not in str(e.value)


@pytest.fixture
def raising_register_path(tmp_path, monkeypatch):
    """A fake installed distribution whose register hook raises."""
    source = (
        "from atlas_server.hookspecs import hookimpl\n\n"
        "@hookimpl\n"
        "def atlas_register_retrievers(register):\n"
        "    register('half', lambda ctx: None)\n"
        "    raise RuntimeError('register hook exploded')\n"
    )
    return fake_distribution(tmp_path, monkeypatch, "regraise", source)


def test_a_register_hook_that_raises_is_named_and_the_rest_load(raising_register_path):
    """Found by an audit: it took `atlas plugins` and `atlas serve` down with a traceback."""
    host = PluginHost()
    assert "dense" in host.retrievers and "half" not in host.retrievers
    row = next(p for p in host.describe() if p["name"] == "regraise")
    assert "RuntimeError: register hook exploded" in row["error"]
    result = CliRunner().invoke(app, ["plugins"])
    assert result.exit_code == 0, result.output
    assert "regraise 0.1 (regraise_atlas_plugin)  FAILED: register hook failed" in result.output
    strict = CliRunner().invoke(app, ["plugins", "--strict"])
    assert strict.exit_code == 1
    assert strict.output.strip().splitlines()[-1] == (
        "error: plugin 'regraise' failed to register: RuntimeError: register hook exploded"
    )


def test_atlas_plugins_lists_everything_beside_a_misspelled_hook_and_a_clash(tmp_path, monkeypatch):
    """The plugin QA pass: one installed package with a misspelled hook or a name the
    built-ins hold stopped `atlas plugins` too, the tool meant to find it. It now lists
    every plugin, the two at fault FAILED with their problem, says each as an error line
    and exits 1; every other command still refuses to start (test below)."""
    typo = (
        "from atlas_server.hookspecs import hookimpl\n\n"
        "@hookimpl\n"
        "def atlas_register_retreivers(register):\n"
        "    register('x', lambda ctx: None)\n"
    )
    clash = (
        "from atlas_server.hookspecs import hookimpl\n\n"
        "@hookimpl\n"
        "def atlas_register_retrievers(register):\n"
        "    register('mine', lambda ctx: None)\n"
        "    register('dense', lambda ctx: None)\n"
    )
    fake_distribution(tmp_path, monkeypatch, "typohook", typo)
    fake_distribution(tmp_path, monkeypatch, "zclash", clash)
    result = CliRunner().invoke(app, ["plugins"])
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert "atlas-retrievers 0.1.0 (plugins.retrievers)" in lines  # the built-ins too
    typo_error = (
        "plugin 'typohook' defines atlas_register_retreivers, which is no Atlas hook"
        " (misspelled?); the hooks are atlas_register_metrics, atlas_register_rerankers,"
        " atlas_register_retrievers, atlas_register_vector_stores"
    )
    clash_error = (
        "retriever 'dense' is registered by both plugin 'atlas-retrievers' and plugin"
        " 'zclash'; uninstall one or rename it, or disable one ([plugins] disable,"
        " ATLAS_DISABLE_PLUGINS)"
    )
    assert f"typohook 0.1 (typohook_atlas_plugin)  FAILED: {typo_error}" in lines
    assert f"zclash 0.1 (zclash_atlas_plugin)  FAILED: {clash_error}" in lines
    assert lines[-2:] == [f"error: {typo_error}", f"error: {clash_error}"]
    rows = {p["name"]: p for p in json.loads(
        CliRunner().invoke(app, ["plugins", "--json"]).stdout)}  # fmt: skip
    assert rows["zclash"]["registered"]["retrievers"] == []  # left out whole, 'mine' too
    with pytest.raises(PluginError, match="no Atlas hook"):
        PluginHost()  # everywhere else it stays fatal


def install_faiss_example(target: Path) -> None:
    """pip-install examples/atlas-faiss-retriever into `target`, as a user would."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(ROOT / "examples" / "atlas-faiss-retriever"),
        ],
        check=True,
        capture_output=True,
    )


def test_example_faiss_package_installs_and_registers(tmp_path):
    target = tmp_path / "site"
    install_faiss_example(target)
    script = textwrap.dedent("""
        import json
        from atlas_server.plugins import PluginHost
        print(json.dumps(PluginHost(strict=True).describe()))
    """)
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    rows = {p["name"]: p for p in json.loads(out.stdout)}
    assert rows["faiss"]["registered"]["retrievers"] == ["faiss"]
    assert rows["faiss"]["distribution"] == "atlas-faiss-retriever"


@pytest.mark.parametrize(
    "command",
    [
        ["serve", "--port", "1"],
        ["rag", "ingest", "README.md", "--collection", "c"],
        ["rag", "query", "heap", "--collection", "c"],
    ],
    ids=["serve", "ingest", "query"],
)
def test_a_plugin_set_the_host_refuses_is_one_line_in_every_command(
    command, monkeypatch, tmp_path, tiny_checkpoint
):
    """Two plugins registering one name (or a misspelled hook) printed a 50-line traceback
    from `atlas serve`, `atlas rag ingest` and `atlas rag query`; `atlas plugins` alone said
    it in one line."""
    from typer.testing import CliRunner

    import atlas_server.plugins
    from atlas_server.cli import app

    def refused():
        raise atlas_server.plugins.PluginError(
            "retriever 'dense' is registered by both plugin 'atlas-retrievers' and plugin "
            "'clash'; uninstall one or rename it"
        )

    monkeypatch.setattr(atlas_server.plugins, "get_plugin_host", refused)
    args = [*command, "--data-dir", str(tmp_path / "store")] if command[0] == "rag" else [
        *command, "--checkpoint", str(tiny_checkpoint)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.exception.__class__ is SystemExit
    assert result.output.strip().splitlines()[-1].startswith("error: retriever 'dense'")
