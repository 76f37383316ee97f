"""`atlas-train`: prepare data, train (also under torchrun), and run the quickstart.

What it does: `atlas-train train --config FILE [--set k=v ...] [--resume] [--profile]`
(also reachable as plain `atlas-train --config ...`), `atlas-train sft --config FILE` and
`atlas-train dpo --config FILE` (the same options and loop; the config's `[sft]` or `[dpo]`
section names the data, `model.init_from` the base checkpoint, `[lora]` adapters),
`atlas-train prepare-data PATH... --tokenizer FILE --output DIR` and `atlas-train
quickstart [--output DIR]`. Errors a user can fix are one line on stderr with exit status 1.
What it does not do: the work itself (see `loop.py`, `data.py`, `quickstart.py`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from atlas_server.checkpoint import CheckpointError
from atlas_server.commands._common import run_app
from atlas_server.model import ConfigError
from atlas_server.tokenizer import TokenizerError

from .config import STAGE_COMMAND, TrainConfigError, TrainingDiverged, load_train_config
from .data import DataError
from .interrupt import NOTHING_SAVED
from .lora import LoRAError

app = typer.Typer(
    name="atlas-train",
    help="Train Atlas models.",
    add_completion=False,
    pretty_exceptions_enable=False,
)
USER_ERRORS = (
    TrainConfigError,
    TrainingDiverged,
    DataError,
    TokenizerError,
    CheckpointError,
    ConfigError,
    LoRAError,
    OSError,  # a missing input, an output that exists or sits under a file, no permission
    ValueError,
)

CONFIG_OPTION = typer.Option(
    None, "--config", "-c", help="Training config TOML (see configs/train/)."
)
SET_OPTION = typer.Option([], "--set", help="Override a key: --set optim.lr=3e-4 (repeatable).")
RESUME_OPTION = typer.Option(
    False,
    "--resume",
    help="Continue from the latest complete checkpoint of run.out_dir (Ctrl-C saves one).",
)
PROFILE_OPTION = typer.Option(
    False, "--profile", help="Record a short torch.profiler trace and print the top operators."
)


def _fail(e: BaseException) -> None:
    print(f"error: {e}", file=sys.stderr)
    raise typer.Exit(1)


@app.command("train")
def train_command(
    config: Path = typer.Option(
        None, "--config", "-c", help="Training config TOML (see configs/train/)."
    ),
    set_: list[str] = typer.Option(
        [], "--set", help="Override a key: --set optim.lr=3e-4 (repeatable)."
    ),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue from the latest complete checkpoint of run.out_dir (Ctrl-C saves one).",
    ),
    profile: bool = typer.Option(
        False, "--profile", help="Record a short torch.profiler trace and print the top operators."
    ),
) -> None:
    """Train a model.

    Example: atlas-train train --config configs/train/tiny-cpu.toml --set run.out_dir=runs/t1
    Distributed: torchrun --nproc-per-node 2 -m trainer.cli train --config ...
    """
    _run_stage("pretrain", config, set_, resume, profile)


@app.command("sft")
def sft_command(
    config: Path = CONFIG_OPTION,
    set_: list[str] = SET_OPTION,
    resume: bool = RESUME_OPTION,
    profile: bool = PROFILE_OPTION,
) -> None:
    """Supervised fine-tuning on chat data, loss on assistant tokens only.

    Example: atlas-train sft --config configs/train/sft-instruct.toml
    --set model.init_from=$HOME/.cache/atlas/quickstart/checkpoint
    """
    _run_stage("sft", config, set_, resume, profile)


@app.command("dpo")
def dpo_command(
    config: Path = CONFIG_OPTION,
    set_: list[str] = SET_OPTION,
    resume: bool = RESUME_OPTION,
    profile: bool = PROFILE_OPTION,
) -> None:
    """Direct preference optimisation on (prompt, chosen, rejected) pairs.

    Example: atlas-train dpo --config configs/train/dpo-instruct.toml
    --set model.init_from=posttrain/sft/checkpoints/step_000120
    """
    _run_stage("dpo", config, set_, resume, profile)


def _run_stage(stage: str, config: Path | None, set_: list[str], resume: bool, profile: bool):
    started = False  # from `train` on, the loop says where a Ctrl-C stopped the run
    try:
        from .loop import PRETRAINING, train  # torch: seconds to import
        from .posttrain import task_for

        cfg = load_train_config(config, set_)
        if cfg.stage != stage:
            what = {"pretrain": "has no [sft] or [dpo] train data"}.get(
                cfg.stage, f"is a {cfg.stage} config ({cfg.stage}.train is set)"
            )
            raise TrainConfigError(
                f"{config or 'the default config'} {what}; run it with {STAGE_COMMAND[cfg.stage]}"
            )
        started = True
        summary = train(cfg, resume=resume, profile=profile, task=task_for(cfg) or PRETRAINING)
    except USER_ERRORS as e:
        _fail(e)
    except KeyboardInterrupt:  # before training, or a second Ctrl-C during it
        if not started:
            print(NOTHING_SAVED, file=sys.stderr)
        raise typer.Exit(130) from None
    if summary.get("interrupted"):  # the loop saved a checkpoint and said how to resume
        raise typer.Exit(summary.get("exit_status", 130))
    if summary.get("checkpoint"):
        typer.echo(f"final checkpoint: {summary['checkpoint']}")


@app.command("prepare-data")
def prepare_data_command(
    paths: list[str] = typer.Argument(
        ..., help="Files, folders, globs, or hf:NAME[:CONFIG][:SPLIT]."
    ),
    tokenizer: Path = typer.Option(
        ..., help="Tokenizer to encode with (atlas_tokenizer.json or a folder holding it)."
    ),
    output: Path = typer.Option(..., help="Folder for the shards and manifest.json."),
    val_fraction: float = typer.Option(0.01, help="Share of documents held out for validation."),
    shard_tokens: int = typer.Option(
        1 << 24, help="Tokens per shard (cut inside a document where need be)."
    ),
    workers: int = typer.Option(None, help="Tokenizer processes (default, or 0: one per CPU)."),
    text_field: str = typer.Option(
        "text", help="Field of .jsonl/.parquet records that holds the text."
    ),
) -> None:
    """Tokenize raw text into token shards (resumable).

    Example: atlas-train prepare-data docs/ --tokenizer tok/atlas_tokenizer.json --output data/tokens
    """
    from .data import prepare_data

    try:
        manifest = prepare_data(
            paths, tokenizer, output, val_fraction, shard_tokens, workers, text_field
        )
    except USER_ERRORS as e:
        _fail(e)
    skipped = len(manifest.get("skipped", ()))
    typer.echo(
        f"{manifest['train_tokens']:,} training and {manifest['val_tokens']:,} validation tokens "
        f"from {manifest['documents']:,} documents in {output}"
        + (
            f" ({skipped:,} input file{'s' * (skipped > 1)} skipped: not UTF-8 text)"
            if skipped
            else ""
        )
    )


@app.command("quickstart")
def quickstart_command(
    output: Path = typer.Option(
        None,
        help="Folder for everything (default: $ATLAS_HOME/quickstart, "
        "~/.cache/atlas/quickstart), the server's embedded default.",
    ),
    steps: int = typer.Option(600, help="Optimizer steps."),
    threads: int = typer.Option(None, help="torch threads."),
) -> None:
    """Train a tokenizer and a small model on the standard library's text (a few minutes on CPU).

    Example: atlas-train quickstart && atlas serve
    """
    from atlas_server.paths import quickstart_dir

    from .quickstart import quickstart

    target = output or quickstart_dir()
    try:
        result = quickstart(target, steps=steps, threads=threads)
    except USER_ERRORS as e:
        _fail(e)
    except KeyboardInterrupt:
        print("stopped; run the same command again to continue", file=sys.stderr)
        raise typer.Exit(130) from None
    if result.get("interrupted"):
        print("run the same command again to continue the quickstart", file=sys.stderr)
        raise typer.Exit(130)
    typer.echo(json.dumps(result, indent=2))


def main() -> None:
    # `atlas-train --config X` is short for `atlas-train train --config X`.
    if len(sys.argv) > 1 and sys.argv[1].startswith("-") and sys.argv[1] not in ("--help", "-h"):
        sys.argv.insert(1, "train")
    run_app(app)


if __name__ == "__main__":
    main()
