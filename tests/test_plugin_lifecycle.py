"""Plugin lifecycle: disabling a plugin (so a third party can replace a built-in), and the
optional `warm_up()` / `close()` of retrievers and rerankers.

The third-party plugin is a fake installed distribution whose `atlas` entry point is a
module written here, discovered as any installed plugin is; the server is the ASGI app
with its lifespan, run by uvicorn on a thread and stopped and waited for, so every
`close()` has run when `running()` returns. The model is not loaded (RAG needs none).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from typer.testing import CliRunner

from atlas_server.api import ServerState, create_app
from atlas_server.api.embeddings import SharedEmbedder
from atlas_server.cli import app
from atlas_server.config import PluginsSection, RAGSection, ServerConfig
from atlas_server.hookspecs import hookimpl
from atlas_server.plugins import PluginError, PluginHost, get_plugin_host
from atlas_server.rag.errors import PluginRuntimeError
from atlas_server.rag.pipeline import RAGPipeline
from atlas_server.rag.types import RAGContext

sys.path.insert(0, str(Path(__file__).parent))
from servers import free_port  # noqa: E402
from test_rag_errors import FakeEmbedder  # noqa: E402

PLUGIN = "lifeplug"  # the fake third party's entry-point name

# The plugin module. Each component records what is called on it in EVENTS; its
# [rag.plugin_options.NAME] `fail` makes one step raise ("factory", "warm_up", "close").
SOURCE = """
from atlas_server.hookspecs import hookimpl
from atlas_server.rag.types import Chunk, RetrievedChunk

EVENTS = []
TEXT = "a heap keeps the smallest item first"


class Component:
    def __init__(self, ctx, name):
        self.name, self.fail = name, ctx.options.get("fail")
        if self.fail == "factory":
            raise RuntimeError(f"{name}: factory failed")
        EVENTS.append(("init", name))

    def warm_up(self):
        EVENTS.append(("warm_up", self.name))
        if self.fail == "warm_up":
            raise RuntimeError(f"{self.name}: model file missing")

    def close(self):
        EVENTS.append(("close", self.name))
        if self.fail == "close":
            raise RuntimeError(f"{self.name}: connection already gone")

    def retrieve(self, collection, query, top_k, filters=None):
        EVENTS.append(("retrieve", self.name))
        chunk = Chunk("id-heap", TEXT, "heap.md", None, 0, len(TEXT))
        return [RetrievedChunk(chunk, 1.0, self.name)]

    def rerank(self, query, candidates, top_k):
        EVENTS.append(("rerank", self.name))
        return list(candidates)[:top_k]


def factory(name):
    def make(ctx):
        return Component(ctx, name)

    make.options = ("fail",)
    return make


@hookimpl
def atlas_register_retrievers(register):
    for name in RETRIEVERS:
        register(name, factory(name))


@hookimpl
def atlas_register_rerankers(register):
    register("own-rerank", factory("own-rerank"))
"""


@pytest.fixture(autouse=True)
def no_disable_env(monkeypatch):
    """Only the tests that set ATLAS_DISABLE_PLUGINS see it, not the shell's."""
    monkeypatch.delenv("ATLAS_DISABLE_PLUGINS", raising=False)


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port `atlas serve` cannot bind (one listens there): a serve that got past the
    check under test fails there, in lines of its own, rather than serving."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def install_plugin(tmp_path: Path, monkeypatch, retrievers: tuple[str, ...]) -> str:
    """Install the fake distribution (on sys.path) registering `retrievers`; its module's
    name, importable once a host has loaded it."""
    module = f"{PLUGIN}_atlas_plugin"
    dist = tmp_path / f"{module}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {PLUGIN}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[atlas]\n{PLUGIN} = {module}\n")
    (tmp_path / f"{module}.py").write_text(f"RETRIEVERS = {retrievers!r}\n{SOURCE}")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(module, None)  # this test's source, not an earlier test's
    return module


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """install_plugin, with the module dropped again after the test."""
    installed: list[str] = []

    def install(retrievers: tuple[str, ...] = ("own", "lazy")):
        installed.append(install_plugin(tmp_path, monkeypatch, retrievers))
        return installed[-1]

    yield install
    for module in installed:
        sys.modules.pop(module, None)


def events(module: str) -> list[tuple[str, str]]:
    return importlib.import_module(module).EVENTS


def server_state(tmp_path, disable=(), **rag) -> ServerState:
    config = ServerConfig(
        rag=RAGSection(data_dir=str(tmp_path / "store"), **rag),
        plugins=PluginsSection(disable=list(disable)),
    )
    return ServerState(config=config, model_name="tiny", embedder=SharedEmbedder(FakeEmbedder))


@contextlib.contextmanager
def running(state: ServerState, host: PluginHost | None = None) -> Iterator[str]:
    """The app of `state` with `host` (default: the host its config asks for, as `atlas
    serve` builds it) served until the block ends, then stopped and waited for: its
    shutdown has run."""
    application = create_app(state, plugin_host=host, load_on_startup=False)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(application, host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120  # a bound for a broken start, not a timing
    while True:
        try:
            httpx.get(base + "/health")  # 503 without a model: any answer means started
            break
        except httpx.TransportError:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(120)
        assert not thread.is_alive(), "the server did not stop"


@pytest.fixture
def rag_log() -> Iterator[list[str]]:
    """The messages "atlas.rag" logs at ERROR, by a handler on that logger itself: a
    Litestar app replaces the root logger's handlers (caplog's) when it is created."""
    messages: list[str] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("atlas.rag")
    logger.addHandler(handler)
    yield messages
    logger.removeHandler(handler)


def retrieve(base: str, **body) -> httpx.Response:
    return httpx.post(
        base + "/v1/retrieve", json={"collection": "notes", "query": "heap", **body}, timeout=60
    )


# --- disabling a plugin ---------------------------------------------------------------
def test_a_disabled_built_in_lets_a_third_party_serve_its_name(tmp_path, plugin):
    """Two plugins registering "hybrid" is fatal; with the built-ins' plugin disabled in
    the server config, the third party's "hybrid" is the server's default retriever, and
    the disabled plugin is listed as such, not missing."""
    module = plugin(("hybrid",))
    with pytest.raises(PluginError, match="'hybrid' is registered by both"):
        PluginHost()
    with running(server_state(tmp_path, disable=["atlas-retrievers"])) as base:
        r = retrieve(base)
        assert r.status_code == 200, r.text
        assert [c["retriever"] for c in r.json()["data"]] == ["hybrid"]
        rows = {p["name"]: p for p in httpx.get(base + "/v1/plugins").json()["data"]}
    assert ("retrieve", "hybrid") in events(module)
    assert rows[PLUGIN]["registered"]["retrievers"] == ["hybrid"]
    assert rows["atlas-retrievers"]["disabled"] is True
    assert rows["atlas-retrievers"]["registered"]["retrievers"] == []
    assert rows["atlas-rerankers"]["disabled"] is False


def test_atlas_plugins_lists_a_disabled_plugin_as_disabled(tmp_path):
    env = {"ATLAS_DISABLE_PLUGINS": "atlas-rerankers"}
    r = CliRunner().invoke(app, ["plugins"], env=env)
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert "atlas-rerankers 0.1.0 (plugins.rerankers)  disabled" in lines
    assert not any(line.strip().startswith("rerankers:") for line in lines)
    assert "    retrievers: dense, bm25, hybrid, hybrid-rrf" in lines  # the others load
    listed = CliRunner().invoke(app, ["plugins", "--json"], env=env)
    rows = {p["name"]: p for p in json.loads(listed.stdout)}
    assert rows["atlas-rerankers"]["disabled"] is True
    assert rows["atlas-metrics"]["disabled"] is False
    # The server config's list, as `atlas serve` reads it.
    config = tmp_path / "server.toml"
    config.write_text('[plugins]\ndisable = ["atlas-metrics"]\n')
    r = CliRunner().invoke(app, ["plugins", "--config", str(config)])
    assert r.exit_code == 0, r.output
    assert "atlas-metrics 0.1.0 (plugins.metrics)  disabled" in r.output.splitlines()


def test_a_misspelt_name_to_disable_is_refused_naming_it(tiny_checkpoint, busy_port):
    """As a misspelt rag.store or rag.retriever is: one line at start, not a server with
    the plugin still on."""
    r = CliRunner().invoke(
        app,
        ["serve", "--checkpoint", str(tiny_checkpoint), "--port", str(busy_port),
         "--set", 'plugins.disable=["atlas-retreivers"]'],
    )  # fmt: skip
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    (line,) = r.output.strip().splitlines()
    assert line.startswith("error: cannot disable 'atlas-retreivers'") and (
        "installed: atlas-metrics, atlas-rerankers, atlas-retrievers, atlas-stores" in line
    ), line
    listed = CliRunner().invoke(app, ["plugins"], env={"ATLAS_DISABLE_PLUGINS": "atlas-retreivers"})
    assert listed.exit_code == 1
    assert listed.output.splitlines()[-1].startswith("error: cannot disable 'atlas-retreivers'")
    assert "atlas-retrievers 0.1.0 (plugins.retrievers)" in listed.output.splitlines()


@pytest.mark.parametrize(
    ("disabled", "says"),
    [
        (
            "atlas-stores",
            "error: no vector store named 'embedded' (disabled plugins: atlas-stores)",
        ),
        (
            "atlas-retrievers",
            "error: rag.retriever 'hybrid' is not registered by any installed plugin "
            "(disabled plugins: atlas-retrievers)",
        ),
    ],
)
def test_disabling_the_configured_store_or_retriever_is_one_line_at_start(
    tiny_checkpoint, busy_port, disabled, says
):
    r = CliRunner().invoke(
        app,
        ["serve", "--checkpoint", str(tiny_checkpoint), "--port", str(busy_port),
         "--set", f'plugins.disable=["{disabled}"]'],
    )  # fmt: skip
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    (line,) = r.output.strip().splitlines()
    assert line.startswith(says), line


@pytest.fixture
def process_host():
    """get_plugin_host() built afresh in the test (it reads the environment), and not
    kept for later tests."""
    get_plugin_host.cache_clear()
    yield
    get_plugin_host.cache_clear()


def test_atlas_disable_plugins_applies_to_the_other_commands(
    tmp_path, monkeypatch, plugin, process_host
):
    """`atlas rag` and `atlas-eval` use the process-wide host: the environment variable
    disables there what the server config does for `atlas serve`."""
    plugin(("hybrid",))
    monkeypatch.setenv("ATLAS_DISABLE_PLUGINS", "atlas-retrievers, atlas-metrics")
    host = get_plugin_host()
    assert host.owner("retrievers", "hybrid") == PLUGIN and "dense" not in host.retrievers
    assert "bleu" not in host.metrics
    r = CliRunner().invoke(
        app, ["rag", "query", "heap", "--collection", "c", "--retriever", "dense",
              "--data-dir", str(tmp_path / "store")],
    )  # fmt: skip
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert "'dense' is not registered by any installed plugin (disabled plugins: " in r.output


# --- warm_up and close ------------------------------------------------------------------
def test_warm_up_runs_at_start_and_close_at_shutdown_once_per_component(tmp_path, plugin):
    """The configured retriever and reranker are built and warmed up before the server
    answers anything; a component a request names first is warmed up before its first
    call; every one built is closed once at shutdown, the last built first."""
    module = plugin()
    state = server_state(tmp_path, retriever="own", reranker="own-rerank")
    with running(state, PluginHost()) as base:
        started = list(events(module))
        for _ in range(2):
            assert retrieve(base).status_code == 200
        assert retrieve(base, retriever="lazy").status_code == 200
        assert not any(kind == "close" for kind, _ in events(module))
    assert started == [
        ("init", "own"), ("warm_up", "own"), ("init", "own-rerank"), ("warm_up", "own-rerank"),
    ]  # fmt: skip
    happened = events(module)
    lazy = [e for e in happened if e[1] == "lazy"]
    assert lazy == [("init", "lazy"), ("warm_up", "lazy"), ("retrieve", "lazy"), ("close", "lazy")]
    assert [e for e in happened if e[0] == "close"] == [
        ("close", "lazy"), ("close", "own-rerank"), ("close", "own"),
    ]  # fmt: skip


def test_a_failing_warm_up_is_named_and_rag_answers_as_for_a_failing_factory(
    tmp_path, plugin, rag_log
):
    """The server still starts; requests get the 502 `plugin_error` naming the plugin
    that a factory that raises gives, and try again; each instance that failed to warm
    up is closed."""
    module = plugin()
    state = server_state(
        tmp_path,
        retriever="own",
        plugin_options={"own": {"fail": "warm_up"}, "lazy": {"fail": "factory"}},
    )
    with running(state, PluginHost()) as base:
        logged = list(rag_log)  # at start-up, before any request
        warm = retrieve(base)
        factory = retrieve(base, retriever="lazy")
        assert httpx.get(base + "/v1/collections").status_code == 200  # the rest serves
    expected = (
        "retriever 'own' (plugin 'lifeplug') failed in warm_up(): RuntimeError: own: "
        "model file missing"
    )
    assert any(message.startswith(expected) for message in logged), logged
    assert (warm.status_code, factory.status_code) == (502, 502), (warm.text, factory.text)
    assert warm.json()["error"]["code"] == factory.json()["error"]["code"] == "plugin_error"
    assert warm.json()["error"]["message"] == expected
    assert factory.json()["error"]["message"].startswith("retriever 'lazy' (plugin 'lifeplug')")
    own = [kind for kind, name in events(module) if name == "own"]
    assert own == ["init", "warm_up", "close"] * 2  # at start, then the request's try


def test_a_failing_close_is_logged_and_the_rest_still_close(tmp_path, plugin, rag_log):
    """Shutdown goes on past it: the retriever, closed after the reranker, is closed, and
    so is the store (its folder can be opened again)."""
    from atlas_server.rag.store import open_store

    module = plugin()
    state = server_state(
        tmp_path,
        retriever="own",
        reranker="own-rerank",
        plugin_options={"own-rerank": {"fail": "close"}},
    )
    with running(state, PluginHost()):
        pass
    closes = [e for e in events(module) if e[0] == "close"]
    assert closes == [("close", "own-rerank"), ("close", "own")]
    assert [m for m in rag_log if "failed in close()" in m] == [
        "reranker 'own-rerank' (plugin 'lifeplug') failed in close(): RuntimeError: "
        "own-rerank: connection already gone"
    ]
    open_store("embedded", tmp_path / "store").close()  # the server let its folder go


def test_async_lifecycle_methods_are_not_awaited_and_say_so(rag_log):
    """As an `async def retrieve` is not awaited: an async warm_up is the plugin's
    failure, saying why; an async close is logged."""

    class AsyncComponent:
        def __init__(self, ctx):
            pass

        async def warm_up(self):
            raise AssertionError("never run")

    class AsyncClose(AsyncComponent):
        warm_up = None

        async def close(self):
            raise AssertionError("never run")

    class Plugin:
        @hookimpl
        def atlas_register_retrievers(self, register):
            register("async-warm", AsyncComponent)
            register("async-close", AsyncClose)

    host = PluginHost(discover=False)
    host.register(Plugin(), "async-plugin")
    pipeline = RAGPipeline(host, RAGContext(None, FakeEmbedder()))
    says = r"\(plugin 'async-plugin'\) failed in warm_up\(\): TypeError: warm_up\(\) is async"
    with pytest.raises(PluginRuntimeError, match=says):
        pipeline.component("retrievers", "async-warm")
    pipeline.component("retrievers", "async-close")
    pipeline.close()
    assert rag_log == [
        "retriever 'async-close' (plugin 'async-plugin') failed in close(): TypeError: "
        "close() is async; Atlas calls it without awaiting: make it plain"
    ]
