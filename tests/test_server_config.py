"""`atlas serve --config`: a config the engine could not run with is refused at the command
line, in one line and with a non-zero exit, before any model loads or port opens."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer

from atlas_server.config import ConfigFileError, load_config, serving_device, with_overrides


def write(tmp_path, text: str):
    path = tmp_path / "server.toml"
    path.write_text(text)
    return path


def test_the_shipped_defaults_load():
    config = load_config(Path(__file__).parent.parent / "configs/server/default.toml")
    # max_running unset: 256 on CUDA, which the step budget must hold too.
    assert config.engine.max_running is None and config.engine.max_batched_tokens >= 256


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[engine]\nmax_batched_tokens = 8\n",
            r"engine.max_batched_tokens \(8\) must be >= engine.max_running \(16, the CPU default\)",
        ),
        ("[engine]\nmax_model_len = 0\n", "engine.max_model_len must be >= 1"),
        ("[engine]\nmax_running = 0\n", "engine.max_running must be >= 1"),
        ("[engine]\nmax_slots = 4\n", "unknown field"),
        ("[engine]\nprefix_caching = 'yes'\n", "'engine.prefix_caching' must be bool"),
        ("[http]\nport = 'eighty'\n", "'http.port' must be int, got 'eighty'"),
        ("[engine]\nkv_cache_gib = 0\n", "engine.kv_cache_gib must be > 0"),
        ("[engine]\nkv_cache_gib = -1.5\n", "engine.kv_cache_gib must be > 0"),
        ("[engine]\ncuda_graphs = 'on'\n", "'engine.cuda_graphs' must be bool"),
        ("[engine]\noverlap = 1\n", "'engine.overlap' must be"),
        ("[model]\ndtype = 'int4'\n", "model.dtype must be auto, float32, bfloat16 or float16"),
        ("[engine\n", "is not valid TOML"),
        ("[model]\ndevice = 'nope'\n", "model.device 'nope': not a device; use auto, cpu, cuda"),
        ("[model]\ndevice = 'mps'\n", "model.device 'mps': Atlas serves on cpu or cuda"),
        ("[rag]\nchunk_max_tokens = 300\n", r"rag.chunk_max_tokens must be in 1..254"),
        ("[rag]\nchunk_max_tokens = 0\n", r"rag.chunk_max_tokens must be in 1..254"),
        (
            "[rag]\nchunk_max_tokens = 50\nchunk_overlap = 50\n",
            r"rag.chunk_overlap \(50\) must be in 0..49",
        ),
    ],
)
def test_bad_config_files_are_refused_with_what_is_wrong(tmp_path, text, message):
    with pytest.raises(ConfigFileError, match=message):
        load_config(write(tmp_path, text))


def test_the_default_device_is_cuda_where_there_is_one_else_the_cpu(monkeypatch):
    """CUDA is the primary target: a server started without a device uses the GPU it sees,
    and a machine with none serves on its CPU, both without a word in the config."""
    assert load_config(None).model.device == "auto"
    assert serving_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert serving_device("auto") == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert serving_device("auto") == "cpu"
    assert serving_device("cuda:1") == "cuda:1" and serving_device("cpu") == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_serve_refuses_a_cuda_device_this_machine_lacks_before_loading(tmp_path, device):
    """Not a server that starts, then answers 503 with the reason only in its log."""
    r = subprocess.run(
        [sys.executable, "-m", "atlas_server.cli", "serve", "--checkpoint", str(tmp_path),
         "--device", device],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 1 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"error: model.device {device!r}: this machine has ")


def test_a_flag_that_breaks_the_budget_is_refused():
    """--max-running 32 against the default budget of 512 is fine; against 16 it is not."""
    config = load_config(None)
    assert with_overrides(config, engine__max_running=32).engine.max_running == 32
    small = with_overrides(config, engine__max_batched_tokens=16)
    with pytest.raises(ConfigFileError, match=r"max_batched_tokens \(16\)"):
        with_overrides(small, engine__max_running=32)


def test_serve_exits_with_one_line_before_loading_anything(tmp_path):
    config = write(tmp_path, "[engine]\nmax_running = 32\nmax_batched_tokens = 16\n")
    r = subprocess.run(
        [sys.executable, "-m", "atlas_server.cli", "serve", "--checkpoint", str(tmp_path),
         "--config", str(config)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "max_batched_tokens (16) must be >=" in lines[0], r.stderr


def test_flags_apply_before_the_checks_across_fields(tmp_path):
    """'flags override both': a file's budget of 8 is valid once --max-running 4 applies
    (it was refused against the default max_running of 16 before the flag was read)."""
    config = write(tmp_path, "[engine]\nmax_batched_tokens = 8\n")
    r = subprocess.run(
        [sys.executable, "-m", "atlas_server.cli", "serve", "--checkpoint", str(tmp_path),
         "--config", str(config), "--max-running", "4"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and "is not an atlas checkpoint" in lines[-1], r.stderr
    assert "max_batched_tokens" not in r.stderr


@pytest.mark.parametrize(
    ("command", "example"),
    [
        (
            "serve",
            "Example: atlas serve --checkpoint ~/.cache/atlas/quickstart/checkpoint --port 8000",
        ),
        ("plugins", "Example: atlas plugins --strict"),
    ],
)
def test_help_shows_an_example_and_no_subcommands_that_do_not_exist(command, example):
    from typer.testing import CliRunner

    from atlas_server.cli import app

    r = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "120"})
    assert r.exit_code == 0, r.output
    assert example in r.output
    assert f"{command} [OPTIONS]" in r.output and "COMMAND [ARGS]" not in r.output


def test_the_plugins_example_runs():
    from typer.testing import CliRunner

    from atlas_server.cli import app

    r = CliRunner().invoke(app, ["plugins", "--strict"])
    assert r.exit_code == 0 and "retrievers: dense, bm25, hybrid, hybrid-rrf" in r.output


def test_serve_refuses_a_bad_chat_template_before_loading_anything(tmp_path, tiny_checkpoint):
    checkpoint = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    (checkpoint / "chat_template.jinja").write_text("{{ messages | no_such_filter }}")
    r = subprocess.run(
        [sys.executable, "-m", "atlas_server.cli", "serve", "--checkpoint", str(checkpoint)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 1 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "chat_template.jinja" in lines[0], r.stderr
    assert "no_such_filter" in lines[0]


@pytest.mark.parametrize(
    ("setting", "named", "listed"),
    [
        ("rag.plugin_options={mmmr={lambda=0.5}}", "'mmmr'", "mmr"),
        ("rag.store_options={hnsw_eff=128}", "'hnsw_eff'", "hnsw_ef"),
        ('rag.retriever="hybird"', "'hybird'", "hybrid"),
        # A misspelt store started a server whose every RAG request answered 503 for good.
        ('rag.store="embeded"', "'embeded'", "embedded"),
    ],
)
def test_serve_refuses_rag_options_nothing_reads_before_loading(
    tmp_path, tiny_checkpoint, setting, named, listed
):
    """A misspelt `[rag.plugin_options.mmmr]` or store option used to be accepted and the
    defaults left in force (the store's only surfaced as a 503 on every RAG request); now
    serve stops before loading, naming the key and what would be read."""
    r = subprocess.run(
        [sys.executable, "-m", "atlas_server.cli", "serve", "--checkpoint", str(tiny_checkpoint),
         "--port", "1", "--set", setting],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 1 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and listed in lines[0], r.stderr


@pytest.mark.parametrize(
    ("options", "components", "named", "listed"),
    [
        ({"mmr": {"lamda": 0.1}}, {}, "'lamda'", "'lambda'"),  # the factory lists its keys
        ({"dense": {"k": 3}}, {}, "'k'", "no options"),
        ({"bleu": {"x": 1}}, {}, "a metric", "retrievers and rerankers"),
        ({"embedded": {"path": "x"}}, {}, "a vector store", "store_options"),
        ({}, {"reranker": "mmmr"}, "'mmmr'", "mmr"),  # [rag] reranker, as the retriever
    ],
)
def test_rag_settings_that_would_be_ignored_or_fail_every_request_are_refused(
    options, components, named, listed
):
    """Option keys a built-in does not read (mmr's `lamda`) were ignored without a word, as
    were tables for metrics and stores, which take none; a misspelt default retriever or
    reranker made every RAG request a 400 blaming the client."""
    from atlas_server.plugins import get_plugin_host
    from atlas_server.rag.pipeline import check_plugin_options

    host = get_plugin_host()
    with pytest.raises(ValueError) as e:
        check_plugin_options(host, options, **components)
    assert named in str(e.value) and listed in str(e.value), e.value
    check_plugin_options(
        host, {"mmr": {"lambda": 0.5}, "hybrid": {"weights": {"dense": 1.0}, "candidates": 20}},
        "hybrid", "mmr",
    )  # fmt: skip


@pytest.mark.parametrize("store", ["embedded", "qdrant", "faiss"])
def test_a_store_option_the_back_end_does_not_read_is_refused(tmp_path, store):
    """`store_options = {hnsw_eff = 128}` used to open the store on its defaults; the error
    names the key and the options the back end reads."""
    from atlas_server.rag.store import StoreError, open_store

    if store == "faiss":
        pytest.importorskip("faiss")
    with pytest.raises(StoreError, match=r"has no option 'hnsw_eff'.*reads .*") as e:
        open_store(store, tmp_path / store, options={"hnsw_eff": 128})
    assert store in str(e.value)
    if store == "embedded":
        assert "hnsw_ef," in str(e.value)
        open_store(store, tmp_path / "ok", options={"hnsw_ef": 128}).close()  # a known one opens


def test_max_running_unset_is_the_devices_default():
    """Unset, max_running is 16 on the CPU and 256 on CUDA, where a step of 256 rows costs
    about what one does and the KV budget is what should limit it (issue 16: "a large GPU
    runs hundreds of sequences"); set, it is itself on either."""
    from atlas_server.engine.runner import resolve_max_running

    assert resolve_max_running("cpu", None) == 16
    assert resolve_max_running("cuda", None) == resolve_max_running("cuda:1", None) == 256
    assert resolve_max_running("cuda", 8) == resolve_max_running("cpu", 8) == 8
    assert load_config(None).engine.max_running is None


def test_a_step_budget_below_the_devices_max_running_is_refused_at_start(
    tmp_path, monkeypatch, capsys
):
    """max_batched_tokens 128 is valid on the CPU (16 rows) but not with CUDA's 256 rows:
    refused in one line before any weights load, naming the default it fell below."""
    from atlas_server.checkpoint import save_checkpoint
    from atlas_server.commands import serve as serve_command
    from atlas_server.model import Transformer, load_preset
    from atlas_server.tokenizer import byte_level_tokenizer

    tok = byte_level_tokenizer()
    path = save_checkpoint(
        tmp_path / "ckpt", Transformer(load_preset("gpt2-tiny", vocab_size=tok.vocab_size)), tok, {}
    )
    config = load_config(None, ["engine.max_batched_tokens=128"])
    serve_command.check_engine_fits(path, config)  # the CPU: 16 rows fit
    monkeypatch.setattr("atlas_server.config.serving_device", lambda device: "cuda")
    with pytest.raises(typer.Exit) as e:
        serve_command.check_engine_fits(path, config)
    assert e.value.exit_code == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert (
        "max_batched_tokens (128) must be >= engine.max_running (256, the default on cuda)" in line
    )


def test_the_base_url_of_a_bound_socket_brackets_an_ipv6_address():
    import socket

    from atlas_server.commands.serve import base_url, bind_socket

    with bind_socket("127.0.0.1", 0) as sock:
        assert base_url(sock) == f"http://127.0.0.1:{sock.getsockname()[1]}"
    if socket.has_ipv6:
        try:
            sock = socket.socket(socket.AF_INET6)
            sock.bind(("::1", 0))
        except OSError:
            return  # no IPv6 loopback on this machine
        with sock:
            assert base_url(sock) == f"http://[::1]:{sock.getsockname()[1]}"
