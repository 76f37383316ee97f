"""What the HTTP layer shares between requests: the engine, the tokenizer and switches.

What it does: holds the loaded engine, tokenizer and chat template, the served model
name, readiness and draining flags, the metrics, the shared sentence embedder, the RAG
service and its prompt augmenter (when `[rag] enabled`) and the plugin host; loads the
checkpoint in a background thread so `/health` can answer 503 while it loads; on shutdown
stops the engine and closes the RAG retrievers, rerankers and store's clients.
What it does not do: handle requests (route modules) or run the model (the engine).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..chat_template import ChatTemplate, NoChatTemplateError, load_chat_template
from ..compute_threads import run_in_fresh_thread
from ..config import ServerConfig, serving_device
from ..engine.types import EngineConfig
from ..tokenizer import Tokenizer
from .errors import ServerDraining, ShutDownBeforeFinishing
from .metrics import Metrics

log = logging.getLogger("atlas.api")


@dataclass
class Augmentation:
    """A prompt (or messages) with retrieved sources added, and what is needed to cite them."""

    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    context: Any = None


class PromptAugmenter(Protocol):
    """The RAG hook: Atlas's RAG package implements it; None means RAG is off.

    `augment` receives the request's `rag` options (a `schemas.RAGOptions`) and either the
    prompt text (completions) or the messages (chat), retrieves and reranks sources, and
    returns the augmented prompt or messages, dropping the lowest-ranked sources when the
    result would exceed `max_prompt_tokens`. `citations` maps the generated text back to
    the sources given, returning (citations, number of dropped references to sources that
    were not given). `sources` (optional: responses leave the field out when an augmenter
    lacks it) lists every source the augmented prompt numbered, in prompt order.
    """

    async def augment(
        self,
        rag: Any,
        prompt: str | None,
        messages: list[dict] | None,
        max_prompt_tokens: int | None = None,
    ) -> Augmentation: ...

    def citations(
        self, augmentation: Augmentation, text: str
    ) -> tuple[list[dict[str, Any]], int]: ...

    def sources(self, augmentation: Augmentation) -> list[dict[str, Any]]: ...


@dataclass
class ServerState:
    config: ServerConfig
    engine: Any = None  # atlas_server.engine.Engine once loaded
    tokenizer: Tokenizer | None = None
    model_name: str = "atlas"
    max_model_len: int = 0
    checkpoint_path: str | None = None
    ready: bool = False
    draining: bool = False
    load_error: str | None = None
    in_flight: int = 0
    metrics: Metrics = field(default_factory=Metrics)
    # None when the checkpoint has no template and its tokenizer no ChatML tokens; then
    # `no_chat_template` says so, and chat requests get it as a 400.
    chat_template: ChatTemplate | None = None
    no_chat_template: str | None = None
    augmenter: PromptAugmenter | None = None
    plugin_host: Any = None  # atlas_server.plugins.PluginHost, built on first use
    embedder: Any = None  # embeddings.SharedEmbedder (create_app makes one)
    rag: Any = None  # atlas_server.rag.service.RAGService when [rag] enabled
    created: int = 0
    _idle: asyncio.Event | None = None
    # The `compute` calls running; the drain's deadline cancels them (they answer 503).
    _computing: set[asyncio.Future] = field(default_factory=set)
    _loader: threading.Thread | None = None  # the load_in_background thread, while it runs

    # --- lifecycle --------------------------------------------------------------------
    def load_in_background(self, checkpoint: str, engine: Any = None) -> threading.Thread:
        """Load the checkpoint and start the engine off the event loop."""

        def load() -> None:
            try:
                self.load(checkpoint, engine)
            except Exception as e:  # reported through /health and the log
                self.load_error = f"{type(e).__name__}: {e}"
                log.error("loading %s failed: %s", checkpoint, self.load_error)

        thread = threading.Thread(target=load, name="atlas-load", daemon=True)
        thread.start()
        self._loader = thread
        return thread

    def load(self, checkpoint: str | None, engine: Any = None) -> None:
        from ..engine import Engine

        if engine is None:
            cfg = self.config
            engine = Engine.from_checkpoint(
                checkpoint,
                EngineConfig(
                    max_running=cfg.engine.max_running,
                    max_batched_tokens=cfg.engine.max_batched_tokens,
                    max_queued=cfg.engine.max_queued,
                    max_model_len=cfg.engine.max_model_len,
                    prefix_caching=cfg.engine.prefix_caching,
                    kv_cache_gib=cfg.engine.kv_cache_gib,
                    cuda_graphs=cfg.engine.cuda_graphs,
                    tf32=cfg.engine.tf32,
                    overlap=cfg.engine.overlap,
                    device=serving_device(cfg.model.device),
                    dtype=cfg.model.dtype,
                    quantize=cfg.model.quantize,
                ),
            )
        # A bad chat template fails the load (named in /health and the log), not each request.
        try:
            self.chat_template = load_chat_template(checkpoint, engine.tokenizer)
        except NoChatTemplateError as e:
            self.no_chat_template = str(e)
        engine.start()
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.checkpoint_path = checkpoint
        self.ready = True
        log.info("model %s ready (max_model_len=%d)", self.model_name, self.max_model_len)

    def shutdown(self) -> None:
        if self._loader is not None and self._loader.is_alive():
            # A process that exits while the loader is inside PyTorch aborts (SIGABRT,
            # "terminate called without an active exception"): a SIGTERM during start-up
            # waits for the load, then stops the engine it started.
            log.warning("waiting for the model load to finish before exiting")
            self._loader.join()
        if self.engine is not None:
            self.engine.shutdown(timeout=5.0)
        if self.rag is not None:
            # Closed here, while the interpreter is whole: a client left to the garbage
            # collector at exit fails in __del__ ("sys.meta_path is None").
            self.rag.close()

    def plugins(self) -> Any:
        """The plugin host (every installed plugin but those `[plugins] disable` and
        ATLAS_DISABLE_PLUGINS name), discovered on first use."""
        if self.plugin_host is None:
            from ..plugins import server_plugin_host

            self.plugin_host = server_plugin_host(self.config.plugins.disable)
        return self.plugin_host

    # --- in-flight accounting (for draining) --------------------------------------------
    async def compute(self, fn: Any, *args: Any) -> Any:
        """Await fn(*args) on a fresh thread (compute_threads), as a request in flight.

        For the routes whose work is not the engine's (retrieval, documents, embeddings,
        plugin discovery): a drain waits for them as for a generation, a draining server
        refuses new ones with 503, and past the drain's deadline one still running (a hung
        plugin) answers 503 at once, its daemon thread left to end on its own. Without
        this, uvicorn cancelled such a request at exit and sent a plain-text 500.
        """
        if self.draining:
            raise ServerDraining
        self.enter()
        work = asyncio.ensure_future(run_in_fresh_thread(fn, *args))
        self._computing.add(work)
        try:
            # wait() returns once `work` is done, cancelled by the drain included; only
            # this request's own cancellation (its client went away) raises out of it.
            await asyncio.wait((work,))
        finally:
            self._computing.discard(work)
            if not work.done():
                work.cancel()
            self.leave()
        if work.cancelled():
            raise ShutDownBeforeFinishing
        return work.result()

    async def drain(self, timeout: float) -> None:
        """Wait up to `timeout` s for the requests in flight; then end what still runs.

        Past the deadline, generations are aborted (streams end with a 503 event, waiting
        requests get a 503 body) and `compute` calls answer 503, so every client hears an
        OpenAI error before the connections close.
        """
        if await self.wait_idle(timeout):
            return
        log.warning("drain timeout: ending %d running request(s)", self.in_flight)
        for work in self._computing:
            work.cancel()
        if self.engine is not None:
            await asyncio.to_thread(self.engine.shutdown, 5.0)
        await self.wait_idle(5.0)

    def enter(self) -> None:
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight; False if the timeout hit first."""
        if self.in_flight == 0:
            return True
        self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False
