"""The retriever example in docs/plugins.md runs as written, through the plugin host."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

from atlas_server.plugins import PluginHost
from atlas_server.rag.pipeline import RAGPipeline
from atlas_server.rag.types import RAGContext, RetrievedChunk

DOC = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"
PASSAGES = {
    "notes": {
        "heapq.md": "a heap keeps the smallest item first and pops it quickly",
        "bisect.md": "bisect finds the insertion point that keeps a list sorted",
        "json.md": "json turns python objects into text and back",
    }
}


def documented_plugin() -> types.ModuleType:
    text = DOC.read_text(encoding="utf-8")
    section = text[text.index("## What a retriever returns") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    module = types.ModuleType("keyword_retriever_example")
    exec(compile(code, str(DOC), "exec"), module.__dict__)
    return module


@pytest.fixture()
def pipeline():
    host = PluginHost(discover=True)
    host.register(documented_plugin(), "keyword-example")
    return RAGPipeline(host, RAGContext(), {"keyword": {"passages": PASSAGES}})


def test_the_documented_retriever_ranks_filters_and_builds_every_field(pipeline):
    results = pipeline.retrieve("notes", "keep a list sorted", 2, "keyword")
    assert [r.chunk.source for r in results] == ["bisect.md", "heapq.md"]
    top = results[0]
    assert isinstance(top, RetrievedChunk) and top.retriever == "keyword"
    text = PASSAGES["notes"]["bisect.md"]
    assert (top.chunk.text, top.chunk.start, top.chunk.end) == (text, 0, len(text))
    again = pipeline.retrieve("notes", "keep a list sorted", 2, "keyword")
    assert [r.chunk.id for r in again] == [r.chunk.id for r in results]  # stable ids
    only = pipeline.retrieve(
        "notes", "keep a list sorted", 3, "keyword", filters={"source": "json.md"}
    )
    assert [r.chunk.source for r in only] == ["json.md"]


def test_the_documented_retriever_refuses_a_filter_it_cannot_honour_as_the_clients(pipeline):
    """The example raised ValueError, so a client's filter became the server's 502,
    against the contract the same page states (InvalidRAGRequest, a 400 naming filters)."""
    from atlas_server.rag.errors import InvalidRAGRequest

    with pytest.raises(InvalidRAGRequest, match="source only") as caught:
        pipeline.retrieve("notes", "q", 2, "keyword", filters={"heading": "x"})
    assert caught.value.param == "filters"


def test_the_documented_retriever_lists_its_options_so_a_typo_is_refused():
    """The plugin QA pass: the example had no `options`, so `[rag.plugin_options.keyword]
    pasages = ...` started a server that served nothing for that table, without a word."""
    from atlas_server.rag.pipeline import check_plugin_options

    host = PluginHost(discover=True)
    host.register(documented_plugin(), "keyword-example")
    check_plugin_options(host, {"keyword": {"passages": PASSAGES}}, "keyword")
    with pytest.raises(ValueError, match="sets 'pasages', which 'keyword' does not read"):
        check_plugin_options(host, {"keyword": {"pasages": PASSAGES}}, "keyword")


def documented_config(data_dir: Path) -> Path:
    """The TOML block after the example, with a store folder of the test's own."""
    text = DOC.read_text(encoding="utf-8")
    section = text[text.index("Installed as a plugin, it serves") :]
    toml = re.search(r"```toml\n(.*?)```", section, re.S).group(1)
    path = data_dir / "server.toml"
    path.write_text(toml.replace("[rag]\n", f"[rag]\ndata_dir = {str(data_dir)!r}\n", 1))
    return path


def test_the_documented_retriever_serves_its_configured_passages(tiny_checkpoint, tmp_path):
    """Options come from `[rag.plugin_options.keyword]`, and the collection the retriever
    serves need not exist in the store (docs/plugins.md)."""
    import httpx

    from atlas_server.api import ServerState, create_app
    from atlas_server.config import load_config

    sys.path.insert(0, str(Path(__file__).parent))
    from servers import serving

    config = load_config(documented_config(tmp_path))
    assert config.rag.plugin_options["keyword"]["passages"]["notes"]
    state = ServerState(config=config, model_name="tiny", checkpoint_path=str(tiny_checkpoint))
    host = PluginHost()
    host.register(documented_plugin(), "keyword-example")
    with serving(create_app(state, plugin_host=host)) as base:
        r = httpx.post(
            base + "/v1/retrieve",
            json={"collection": "notes", "query": "keep a list sorted"},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        ranked = [c["source"] for c in r.json()["data"]]
        assert ranked[0] == "bisect.md" and r.json()["data"][0]["retriever"] == "keyword"
        filtered = httpx.post(
            base + "/v1/retrieve",
            json={"collection": "notes", "query": "heap", "filters": {"heading": "x"}},
            timeout=60,
        )
        assert filtered.status_code == 400, filtered.text
        assert filtered.json()["error"]["param"] == "filters"


def test_atlas_rag_query_with_the_documented_config_asks_the_plugin(tmp_path, monkeypatch):
    """The plugin QA pass: `atlas rag query --config server.toml --collection notes` said
    "collection 'notes' does not exist" (a check before the embedder loads), where the
    server answers the same query: a plugin's retriever may serve collections of its own."""
    from typer.testing import CliRunner

    import atlas_server.plugins as plugins
    from atlas_server.cli import app

    host = PluginHost(discover=True)
    host.register(documented_plugin(), "keyword-example")
    monkeypatch.setattr(plugins, "get_plugin_host", lambda: host)
    config = documented_config(tmp_path)
    args = ["rag", "query", "keep a list sorted", "--collection", "notes", "--config", str(config)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].split()[2] == "bisect.md"
    # Atlas's own retrievers search the store, so there a missing collection is still said
    # before the embedder loads.
    missing = CliRunner().invoke(app, [*args, "--retriever", "dense"])
    assert missing.exit_code == 1 and "collection 'notes' does not exist" in missing.output
