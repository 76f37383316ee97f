"""Server configuration: TOML decoded into frozen, validated structs.

What it does: defines `ServerConfig` (model, engine, http, rag and plugins sections), loads it from
a TOML file and `--set section.key=value` options through Atlas's one config loader
(`tomlconfig.py`: unknown keys and wrong types are refused, naming them), applies the few
command-line overrides and
renders the resolved config for the start-up log. Defaults live here and only here;
`configs/server/default.toml` spells them out for users to copy.
What it does not do: start anything, or read secrets: the API key comes from the command
line, the ATLAS_API_KEY environment variable or a secret file, never from this file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import msgspec

from . import tomlconfig


class ConfigFileError(ValueError):
    """A server config file that cannot be used; the message names the key or the file."""


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class ModelSection(_Section):
    # None: the embedded default (ATLAS_CHECKPOINT, else the quickstart checkpoint).
    checkpoint: str | None = None
    name: str | None = None  # the id in /v1/models; default: the checkpoint folder's name
    device: str = "auto"  # cuda when PyTorch sees a CUDA device, else cpu
    dtype: str = "auto"  # bfloat16 on CUDA, float32 elsewhere
    # Weights for serving on the CPU: "none" (as the model's dtype) or "int8" (8-bit
    # weights in blocks of 32 with a scale each, llama.cpp's q8_0; fp32 arithmetic).
    quantize: str = "none"


class EngineSection(_Section):
    max_running: int | None = None  # None: 16 on the CPU, 256 on CUDA
    max_batched_tokens: int = 512
    max_queued: int = 256
    max_model_len: int | None = None
    prefix_caching: bool = True
    kv_cache_gib: float | None = None  # None: max_running slots (CPU); 50% of free (CUDA)
    cuda_graphs: bool = True
    tf32: bool = False
    overlap: bool | None = None  # None: on with CUDA, off on the CPU


class HTTPSection(_Section):
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 4 * 1024 * 1024
    # Seconds a SIGTERM waits for running requests before ending them (keep it below
    # Kubernetes' terminationGracePeriodSeconds).
    drain_timeout_s: float = 20.0
    # Seconds a request body may go without arriving before a 408 (nginx's
    # client_body_timeout default); 0 turns it off.
    body_timeout_s: float = 60.0
    cors_allow_origins: list[str] = []


# The server embeds with all-MiniLM-L6-v2: a 256-piece window less [CLS] and [SEP].
MAX_CHUNK_TOKENS = 254


class RAGSection(_Section):
    enabled: bool = True
    # The vector store back end, by registered name (`atlas plugins` lists them):
    # embedded (default), qdrant, milvus, faiss. docs/rag.md says which at which scale.
    store: str = "embedded"
    # The store's folder, for in-process stores; default $ATLAS_HOME/rag/STORE, else
    # ~/.local/share/atlas/rag/STORE.
    data_dir: str | None = None
    store_url: str | None = None  # a Qdrant or Milvus server / cluster
    store_options: dict[str, Any] = {}  # back-end tuning, e.g. {hnsw_ef = 128}
    qdrant_url: str | None = None  # shorthand kept from before: store "qdrant" at this URL
    retriever: str = "hybrid"
    reranker: str | None = None
    top_k: int = 4
    # How POST /v1/collections/NAME/documents chunks text, in embedder word pieces (as
    # `atlas rag ingest --max-tokens/--overlap`): a model with a short context needs
    # shorter chunks for a source to fit beside the question.
    chunk_max_tokens: int = 200
    chunk_overlap: int = 40
    # Options of retrievers and rerankers by registered name, handed to the component as
    # ctx.options: [rag.plugin_options.cross-encoder] model_path = "..." (docs/plugins.md).
    plugin_options: dict[str, dict[str, Any]] = {}


class PluginsSection(_Section):
    # Plugins not loaded, by the name `atlas plugins` lists (e.g. "atlas-retrievers"), so
    # another plugin can take the names they register; besides ATLAS_DISABLE_PLUGINS's.
    # A name no installed plugin has is refused at start (docs/plugins.md).
    disable: list[str] = []


class ServerConfig(_Section):
    model: ModelSection = ModelSection()
    engine: EngineSection = EngineSection()
    http: HTTPSection = HTTPSection()
    rag: RAGSection = RAGSection()
    plugins: PluginsSection = PluginsSection()

    def validate(self) -> ServerConfig:
        checks = [
            (
                self.engine.max_running is None or self.engine.max_running >= 1,
                "engine.max_running must be >= 1",
            ),
            (
                # Unset, it is 16 on the CPU and 256 on CUDA: checked against the device
                # at start (commands/serve.check_engine_fits), where the device is known.
                self.engine.max_batched_tokens >= (self.engine.max_running or 16),
                f"engine.max_batched_tokens ({self.engine.max_batched_tokens}) must be >= "
                f"engine.max_running ({self.engine.max_running or '16, the CPU default'}):"
                " every running sequence "
                "needs one token of each step",
            ),
            (
                self.engine.max_model_len is None or self.engine.max_model_len >= 1,
                "engine.max_model_len must be >= 1 (its upper bound is the model's context)",
            ),
            (self.engine.max_queued >= 0, "engine.max_queued must be >= 0"),
            (
                self.engine.kv_cache_gib is None or self.engine.kv_cache_gib > 0,
                "engine.kv_cache_gib must be > 0 (leave it out for the default)",
            ),
            (
                self.model.dtype in ("auto", "float32", "bfloat16", "float16"),
                f"model.dtype must be auto, float32, bfloat16 or float16, got {self.model.dtype!r}",
            ),
            (
                self.model.quantize in ("none", "int8"),
                f"model.quantize must be none or int8, got {self.model.quantize!r}",
            ),
            (0 < self.http.port < 65536, "http.port must be in 1..65535"),
            (self.http.max_body_bytes >= 1024, "http.max_body_bytes must be >= 1024"),
            (self.http.drain_timeout_s >= 0, "http.drain_timeout_s must be >= 0"),
            (self.http.body_timeout_s >= 0, "http.body_timeout_s must be >= 0 (0: off)"),
            (self.rag.top_k >= 1, "rag.top_k must be >= 1"),
            (
                1 <= self.rag.chunk_max_tokens <= MAX_CHUNK_TOKENS,
                f"rag.chunk_max_tokens must be in 1..{MAX_CHUNK_TOKENS} (the embedder's "
                "window less its special tokens)",
            ),
            (
                0 <= self.rag.chunk_overlap < self.rag.chunk_max_tokens,
                f"rag.chunk_overlap ({self.rag.chunk_overlap}) must be in 0.."
                f"{self.rag.chunk_max_tokens - 1} (below rag.chunk_max_tokens)",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigFileError(message)
        problem = device_problem(self.model.device)
        if problem is not None:
            raise ConfigFileError(f"model.device {self.model.device!r}: {problem}")
        return self


def serving_device(device: str) -> str:
    """The device `model.device` names: "auto" is cuda where PyTorch sees a CUDA device
    (CUDA is Atlas's primary target), else cpu; any other name is itself."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def device_problem(device: str) -> str | None:
    """Why the server cannot run on `device`, or None: checked at start, so a typo or a CUDA
    device on a machine without one is a one-line error, not a server that answers 503."""
    import torch  # here, not at import: reading a config needs no PyTorch

    if device == "auto":
        return None
    try:
        parsed = torch.device(device)
    except RuntimeError:
        return "not a device; use auto, cpu, cuda or cuda:N"
    if parsed.type not in ("cpu", "cuda"):
        return "Atlas serves on cpu or cuda"
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only PyTorch" if torch.version.cuda is None else "no visible CUDA device"
            return f"this machine has {build}"
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            return f"only {torch.cuda.device_count()} CUDA device(s) exist"
    return None


def load_config(
    path: str | os.PathLike | None = None, overrides: Sequence[str] = (), validate: bool = True
) -> ServerConfig:
    """Read a TOML server config (or the defaults when `path` is None), then `--set` options.

    `validate=False` leaves the checks across fields to a later `with_overrides` (command-line
    flags come last: a file's max_batched_tokens = 8 is fine once --max-running 4 applies)."""
    layers = [tomlconfig.file_layer(path, ConfigFileError)] if path is not None else []
    layers.append(tomlconfig.set_layer(overrides, ConfigFileError))
    config = tomlconfig.decode(ServerConfig, layers, ConfigFileError)
    return config.validate() if validate else config


def with_overrides(config: ServerConfig, **overrides: Any) -> ServerConfig:
    """Apply `section__field=value` overrides whose value is not None (command-line flags)."""
    sections: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        section, field = key.split("__", 1)
        sections.setdefault(section, {})[field] = value
    changed = {
        name: msgspec.structs.replace(getattr(config, name), **fields)
        for name, fields in sections.items()
    }
    return msgspec.structs.replace(config, **changed).validate()


def render(config: ServerConfig) -> str:
    """The resolved config as TOML-like text for the start-up log."""
    lines = []
    for section, values in msgspec.to_builtins(config).items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {v!r}" for k, v in values.items()]
    return "\n".join(lines)
