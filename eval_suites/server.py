"""Start an Atlas server for a run (`atlas-eval run --checkpoint DIR`) and stop it afterwards.

What it does: picks a free loopback port, runs `atlas serve --checkpoint DIR` as a child
process with its log, its config and its embedded Qdrant store in the run's output
directory, waits until /health answers 200, and
on exit sends SIGTERM (the server drains gracefully), then SIGKILL after a grace period.
It also gives the checkpoint a stable identity (path + weights hash) for the response
cache, since the port differs between runs. What it does not do: start anything that is
not Atlas (use --base-url for other servers) or bind outside 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from .errors import EvalError

__all__ = ["checkpoint_identity", "free_port", "local_atlas_server", "wait_for_health"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def checkpoint_identity(checkpoint: Path) -> str:
    """`checkpoint://<abs path>#<sha256 of config.json + model.safetensors>`."""
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors", "atlas_tokenizer.json", "tokenizer.json"):
        path = checkpoint / name
        if path.is_file():
            with path.open("rb") as f:
                for block in iter(lambda f=f: f.read(1 << 22), b""):
                    h.update(block)
    return f"checkpoint://{checkpoint.resolve()}#{h.hexdigest()[:16]}"


def wait_for_health(
    base_url: str, process: subprocess.Popen | None, timeout_s: float, log: Path | None
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise EvalError(
                f"the server exited with status {process.returncode} while starting; {tail(log)}"
            )
        try:
            health = httpx.get(f"{base_url}/health", timeout=2.0)
            if health.status_code == 200:
                return
            if _load_failed(health):  # Atlas says why (a bad checkpoint): no use waiting
                raise EvalError(f"the server at {base_url} failed to load: {_load_failed(health)}")
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise EvalError(
        f"the server at {base_url} was not healthy after {timeout_s:.0f} s; {tail(log)}"
    )


def _load_failed(health: httpx.Response) -> str | None:
    """Atlas's /health error while not serving ({"status": "error", "error": WHY}), if any."""
    try:
        body = health.json()
    except ValueError:
        return None
    if isinstance(body, dict) and body.get("status") == "error":
        return str(body.get("error") or "no reason given")
    return None


def tail(log: Path | None, lines: int = 5) -> str:
    if log is None or not log.is_file():
        return "no server log"
    # The health polls' access-log lines would crowd out what the server said.
    text = [
        line
        for line in log.read_text(errors="replace").strip().splitlines()
        if "GET /health" not in line
    ][-lines:]
    return f"last lines of {log}: " + " | ".join(text) if text else f"{log} is empty"


@contextlib.contextmanager
def local_atlas_server(
    checkpoint: Path,
    log_dir: Path,
    api_key: str | None = None,
    startup_timeout_s: float = 180.0,
    extra_args: tuple[str, ...] = (),
) -> Iterator[str]:
    """Yield the base URL of an `atlas serve` child process serving `checkpoint`."""
    if not (checkpoint / "config.json").is_file():
        raise EvalError(f"{checkpoint} is not an atlas checkpoint (no config.json)")
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / "server.log"
    # The child's embedded Qdrant store lives in the run's folder: the default store may be
    # locked by a server already running, and an evaluation should not write into it.
    config = log_dir / "server.toml"
    config.write_text(f"[rag]\ndata_dir = {json.dumps(str(log_dir / 'qdrant'))}\n")
    command = [
        sys.executable,
        "-m",
        "atlas_server.cli",
        "serve",
        "--checkpoint",
        str(checkpoint),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--config",
        str(config),
        *extra_args,
    ]
    env = dict(os.environ)
    if api_key:
        env["ATLAS_API_KEY"] = api_key
    with log.open("w") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        base_url = f"http://127.0.0.1:{port}"
        try:
            wait_for_health(base_url, process, startup_timeout_s, log)
            yield base_url
        finally:
            stop(process)


def stop(process: subprocess.Popen, grace_s: float = 20.0) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
