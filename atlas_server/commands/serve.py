"""`atlas serve`: load a checkpoint and serve it over the OpenAI-compatible API.

What it does: resolves the config (defaults < --config TOML < flags), finds the checkpoint
(flag, config, ATLAS_CHECKPOINT, then the embedded default made by `atlas-train
quickstart`) and checks its chat template, reads the API key from the flag, ATLAS_API_KEY
or a secret file, prints the resolved config (with the checkpoint it resolved), and runs
uvicorn. SIGTERM/SIGINT drain: /health turns 503, new
generation requests get 503, running requests get up to `http.drain_timeout_s` to finish,
then the server stops and exits 0. A second SIGINT forces the exit.
What it does not do: routes (see `atlas_server/api/`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
from pathlib import Path

import typer

from ..config import ConfigFileError, load_config, render, with_overrides
from ..paths import quickstart_dir
from ._common import fail, user_errors

log = logging.getLogger("atlas.serve")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's


def default_checkpoint() -> Path:
    """The embedded default: the quickstart checkpoint (see `atlas-train quickstart`)."""
    return quickstart_dir() / "checkpoint"


def resolve_checkpoint(flag: str | None, configured: str | None) -> Path:
    for candidate in (flag, configured, os.environ.get("ATLAS_CHECKPOINT")):
        if candidate:
            path = Path(candidate).expanduser()
            if not (path / "config.json").is_file():
                if (path / "adapter.json").is_file():
                    fail(
                        f"{path} holds a LoRA adapter, not a model; merge it into its base "
                        "first: atlas checkpoint merge-lora BASE ADAPTER OUT"
                    )
                fail(f"{path} is not an atlas checkpoint (no config.json there)")
            return path
    path = default_checkpoint()
    if not (path / "config.json").is_file():
        fail(
            f"no checkpoint given and no embedded default at {path}; pass --checkpoint DIR "
            "or create the default with `atlas-train quickstart`"
        )
    return path


def read_api_key(flag: str | None, key_file: Path | None) -> str | None:
    if flag:
        return flag
    if key_file is not None:
        try:
            key = key_file.read_text().strip()
        except OSError as e:
            fail(f"cannot read --api-key-file {key_file}: {e.strerror}")
        if not key:
            fail(f"--api-key-file {key_file} is empty")
        return key
    return os.environ.get("ATLAS_API_KEY") or None


class DrainingServer:
    """uvicorn.Server whose first SIGTERM/SIGINT drains before stopping."""

    def __new__(cls, config, state, drain_timeout: float):
        import uvicorn

        class _Server(uvicorn.Server):
            def handle_exit(self, sig, frame) -> None:
                if state.draining:  # second signal: stop now
                    self.force_exit = sig == signal.SIGINT
                    self.should_exit = True
                    return
                state.draining = True
                log.warning("signal %s: draining (up to %.0f s) before exit", sig, drain_timeout)
                loop = self._loop
                loop.call_soon_threadsafe(lambda: loop.create_task(self._drain()))

            async def _drain(self) -> None:
                # Every running request answers before uvicorn's own graceful-shutdown
                # wait, which would cancel it and send a plain-text 500.
                await state.drain(drain_timeout)
                self.should_exit = True

            async def serve(self, sockets=None) -> None:
                self._loop = asyncio.get_running_loop()
                await super().serve(sockets)

        return _Server(config)


class AnswerCutRequests:
    """ASGI wrapper: a request uvicorn cancels at shutdown before it was answered gets the
    OpenAI 503 body, not uvicorn's plain-text 500 and a logged traceback.

    The drain answers every request it knows of (ServerState.drain); this catches the
    others, such as one whose body was still uploading at SIGTERM, which no handler had
    seen yet. Only while draining, and only before a response began (sending a second
    start is then refused, and the cancellation goes on as before): nothing is added to
    the messages of a request that is not cut.
    """

    def __init__(self, app, state) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        try:
            await self.app(scope, receive, send)
        except asyncio.CancelledError:
            if scope["type"] != "http" or not self.state.draining or not await _answer_503(send):
                raise


def asgi_app(application, state):
    """What uvicorn runs: the Litestar app, with stalled bodies answered 408 (inside, so
    the 408 is a response the drain's 503 does not replace) and cut requests 503."""
    from ..api.body_timeout import BodyReadTimeout

    timed = BodyReadTimeout(application, state.config.http.body_timeout_s, state.metrics.errors)
    return AnswerCutRequests(timed, state)


async def _answer_503(send) -> bool:
    """Send the shutdown's OpenAI 503; False if a response had already begun."""
    from ..api.errors import ShutDownBeforeFinishing

    body = json.dumps(ShutDownBeforeFinishing().body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    try:
        await send({"type": "http.response.start", "status": 503, "headers": headers})
    except RuntimeError:  # uvicorn: a response was already started
        return False
    await send({"type": "http.response.body", "body": body})
    return True


def check_chat_template(path: Path) -> None:
    """Refuse, before any weights load, a checkpoint whose chat_template.jinja is unusable."""
    from ..chat_template import TEMPLATE_FILE, ChatTemplateError, load_chat_template
    from ..checkpoint import TOKENIZER_FILE, CheckpointError, read_metadata
    from ..tokenizer import Tokenizer

    if not (path / TEMPLATE_FILE).is_file():
        return
    with user_errors(ChatTemplateError, CheckpointError):
        name = read_metadata(path).get("tokenizer", {}).get("file", TOKENIZER_FILE)
        load_chat_template(path, Tokenizer.from_file(path / name))


def check_engine_fits(path: Path, cfg) -> None:
    """Refuse, before any weights load, engine settings this checkpoint cannot honour: a
    context longer than the model's, a step budget below the device's default max_running,
    or a KV budget that holds no slot. Found later, in the
    background load, they left a server up that answered 503 for good (vLLM exits)."""
    import torch

    from ..checkpoint import CheckpointError, read_metadata
    from ..config import serving_device
    from ..engine import cuda_runner
    from ..engine.runner import resolve_dtype, resolve_max_running
    from ..model import ModelConfig

    with user_errors(CheckpointError, ValueError):
        model = ModelConfig.from_dict(read_metadata(path)["model"])
        max_len = cfg.engine.max_model_len or model.max_seq_len
        if max_len > model.max_seq_len:
            raise ValueError(
                f"engine.max_model_len={max_len} exceeds the model's context of "
                f"{model.max_seq_len} positions ({path}); leave it unset or lower it"
            )
        device = serving_device(cfg.model.device)
        max_running = resolve_max_running(device, cfg.engine.max_running)
        if cfg.engine.max_batched_tokens < max_running:  # unset, max_running is the device's
            raise ValueError(
                f"engine.max_batched_tokens ({cfg.engine.max_batched_tokens}) must be >= "
                f"engine.max_running ({max_running}, the default on {device}): every running"
                " sequence needs one token of each step; raise it or set engine.max_running"
            )
        if cfg.model.quantize != "none":  # now: after the load it would be a 503 for good
            from ..model.transformer import check_quantize

            dtype = getattr(torch, resolve_dtype(device, cfg.model.dtype))
            check_quantize(cfg.model.quantize, device, dtype)
        if cfg.engine.kv_cache_gib is not None:
            dtype = resolve_dtype(device, cfg.model.dtype)
            per_slot = cuda_runner.kv_bytes_per_slot(model, max_len, getattr(torch, dtype))
            budget = cuda_runner.kv_budget_bytes(cfg.engine.kv_cache_gib, None)
            cuda_runner.kv_slots(budget, per_slot, max_running)


def serve(
    checkpoint: str = typer.Option(None, "--checkpoint", "-c", help="Atlas checkpoint directory."),
    host: str = typer.Option(
        None, help="Address to bind (default 127.0.0.1; 0.0.0.0 in containers)."
    ),
    port: int = typer.Option(None, help="Port (default 8000)."),
    config: Path = typer.Option(
        None, "--config", help="Server config TOML (see configs/server/default.toml)."
    ),
    set_: list[str] = typer.Option(
        [],
        "--set",
        help="Override a config key: --set engine.max_batched_tokens=1024 (repeatable).",
    ),
    api_key: str = typer.Option(
        None,
        "--api-key",
        help="Require `Authorization: Bearer KEY` on every route but /health, /metrics and "
        "/schema (or ATLAS_API_KEY).",
    ),
    api_key_file: Path = typer.Option(
        None, "--api-key-file", help="Read the API key from this file (a mounted secret)."
    ),
    model_name: str = typer.Option(
        None, "--model-name", help="Model id in /v1/models (default: checkpoint folder name)."
    ),
    dtype: str = typer.Option(
        None, help="auto (bfloat16 on CUDA, float32 elsewhere), float32, bfloat16 or float16."
    ),
    device: str = typer.Option(
        None, help="auto (cuda where PyTorch sees one, else cpu), cpu, cuda or cuda:N."
    ),
    quantize: str = typer.Option(
        None,
        help="none, or int8: 8-bit weights (llama.cpp's q8_0 blocks) for faster decoding on "
        "the CPU.",
    ),
    max_running: int = typer.Option(None, help="Sequences decoded together (KV-cache slots)."),
    log_level: str = typer.Option(
        "info", help="Log level: critical, error, warning, info, debug or trace."
    ),
) -> None:
    """Serve a checkpoint over the OpenAI-compatible API (and RAG, unless disabled).

    Checkpoint: --checkpoint, else model.checkpoint in --config,
    else ATLAS_CHECKPOINT, else the quickstart's. SIGTERM or Ctrl-C
    drains running requests, then exits.

    Example: atlas serve --checkpoint ~/.cache/atlas/quickstart/checkpoint --port 8000
    """
    import uvicorn

    from ..api import ServerState, create_app

    if log_level.lower() not in LOG_LEVELS:
        fail(f"--log-level {log_level!r} is not one of {', '.join(LOG_LEVELS)}")
    with user_errors(ConfigFileError):
        cfg = load_config(config, set_, validate=False)  # checked once the flags apply
        cfg = with_overrides(
            cfg,
            http__host=host,
            http__port=port,
            model__name=model_name,
            model__dtype=dtype,
            model__device=device,
            model__quantize=quantize,
            engine__max_running=max_running,
        )
    path = resolve_checkpoint(checkpoint, cfg.model.checkpoint)
    check_chat_template(path)
    check_engine_fits(path, cfg)
    from ..plugins import server_plugin_host

    # Plugins the host refuses (two claim one name, a disabled name no plugin has): one
    # line, not later.
    with user_errors():
        host = server_plugin_host(cfg.plugins.disable)
    if cfg.rag.enabled:  # config mistakes stop the start, not every later RAG request
        from ..rag.pipeline import check_plugin_options
        from ..rag.store import StoreError, check_store_options, store_name

        with user_errors(ValueError, StoreError):
            check_plugin_options(host, cfg.rag.plugin_options, cfg.rag.retriever, cfg.rag.reranker)
            check_store_options(store_name(cfg.rag)[0], dict(cfg.rag.store_options), host)
    # The printed config names the checkpoint actually served, not the unset default.
    cfg = with_overrides(cfg, model__checkpoint=str(path))
    key = read_api_key(api_key, api_key_file)
    logging.basicConfig(
        level=logging.DEBUG if log_level.lower() == "trace" else log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    typer.echo(
        f"atlas serve: checkpoint {path}\n{render(cfg)}\napi key: {'set' if key else 'none'}"
    )
    # A checkpoint folder called "checkpoint" (the quickstart's) is named after its parent.
    default_name = path.resolve().parent.name if path.name == "checkpoint" else path.name
    state = ServerState(
        config=cfg, model_name=cfg.model.name or default_name, checkpoint_path=str(path)
    )
    application = create_app(state, api_key=key, plugin_host=host)
    uv_config = uvicorn.Config(
        asgi_app(application, state),
        host=cfg.http.host,
        port=cfg.http.port,
        log_level=log_level.lower(),
        timeout_graceful_shutdown=5,
    )
    # Bound here, before anything loads: uvicorn would log a bind error and exit while the
    # model loader thread is inside PyTorch, which aborts the process (SIGABRT).
    sock = bind_socket(cfg.http.host, cfg.http.port)
    # uvicorn says where it listens only when it binds the socket itself.
    typer.echo(f"atlas serve: listening on {base_url(sock)} (/health answers 200 once loaded)")
    server = DrainingServer(uv_config, state, cfg.http.drain_timeout_s)
    server.run(sockets=[sock])


def base_url(sock: socket.socket) -> str:
    """http://HOST:PORT of a bound socket (an IPv6 address in brackets)."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (IPv4 or IPv6), or a one-line error and exit 1."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        sock.bind(address)
    except OSError as e:  # in use, not an address of this machine, a bad name
        fail(f"cannot listen on {host}:{port}: {e.strerror or e}")
    return sock
