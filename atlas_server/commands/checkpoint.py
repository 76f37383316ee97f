"""`atlas checkpoint`: inspect, create, migrate, import and export atlas checkpoints.

What it does: `inspect DIR` (parameter counts, config, tokenizer, chat template, what it was
imported from, provenance, file sizes; `--json` for scripts), `init --preset NAME
--tokenizer FILE --output DIR` (a randomly initialised model whose vocabulary matches the
tokenizer), `migrate DIR` (an older checkpoint layout to the current one, in place),
`import-hf SRC DST` (a Hugging Face folder or hub repository), `export-hf DIR OUT` (a
folder `transformers` loads) and `export-gguf DIR OUT.gguf` (a file llama.cpp runs).
What it does not do: training (see `atlas-train`).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
import typer

from ..checkpoint import load_checkpoint, migrate_checkpoint, read_metadata, save_checkpoint
from ..model import Transformer, load_preset, preset_names
from ..tokenizer import Tokenizer
from ._common import user_errors

app = typer.Typer(
    help="Inspect, create, migrate, import and export atlas checkpoints.", no_args_is_help=True
)


def _param_groups(model: Transformer) -> dict[str, int]:
    groups: Counter[str] = Counter()
    for name, p in model.named_parameters():
        if name.startswith("blocks."):
            kind = name.split(".")[2]  # attn, mlp, attn_norm, mlp_norm
            groups[f"blocks.{'norm' if kind.endswith('norm') else kind}"] += p.numel()
        else:
            groups[name.split(".")[0]] += p.numel()
    return dict(sorted(groups.items()))


def describe(directory: Path) -> dict:
    meta = read_metadata(directory)
    ckpt = load_checkpoint(directory)
    model = ckpt.model
    files = {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file()}
    tok = ckpt.tokenizer
    provenance = meta.get("provenance", {})
    imported = {
        k: provenance[k]
        for k in ("source", "revision", "commit", "architecture", "imported_from")
        if k in provenance and (k != "source" or "imported_from" in provenance)
    }
    return {
        "path": str(directory),
        "format_version": meta["format_version"],
        "imported": imported or None,
        "chat_template": "chat_template.jinja" if ckpt.chat_template is not None else None,
        "parameters": {
            "total": model.num_parameters(),
            "non_embedding": model.num_parameters(exclude_embeddings=True),
            "by_group": _param_groups(model),
        },
        "model": meta["model"],
        "tokenizer": {
            "name": tok.name,
            "vocab_size": tok.vocab_size,
            "merges": len(tok.merges or []),
            "special_tokens": tok.special_tokens,
            **meta.get("tokenizer", {}),
        },
        "provenance": meta.get("provenance", {}),
        "files": files,
    }


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G"):
        if abs(n) < 1000:
            return f"{n:.1f}{unit}" if unit else f"{int(n)}"
        n /= 1000
    return f"{n:.1f}T"


@app.command()
def inspect(
    directory: Path = typer.Argument(..., help="Checkpoint directory."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """Show parameter counts, config, tokenizer, provenance and file sizes.

    Example: atlas checkpoint inspect runs/quickstart/checkpoint
    """
    with user_errors():
        info = describe(directory)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    params = info["parameters"]
    typer.echo(f"checkpoint {info['path']} (format v{info['format_version']})")
    if info["imported"]:
        src = info["imported"]
        where = src.get("source", "?")
        at = f" @ {src['commit']}" if "commit" in src else ""
        rev = f" (revision {src['revision']}{at})" if "revision" in src else ""
        typer.echo(
            f"imported: {src.get('architecture', src.get('imported_from'))} from {where}{rev}"
        )
    typer.echo(
        f"parameters: {_human(params['total'])} total, {_human(params['non_embedding'])} non-embedding"
    )
    for group, n in params["by_group"].items():
        typer.echo(f"  {group:<16} {n:>14,}")
    typer.echo("model config:")
    for k, v in info["model"].items():
        typer.echo(f"  {k:<16} {v}")
    tok = info["tokenizer"]
    typer.echo(
        f"tokenizer: {tok['name']}, {tok['vocab_size']} ids, {tok['merges']} merges, "
        f"specials {sorted(tok['special_tokens'])}"
    )
    typer.echo(
        "chat template: "
        + ("chat_template.jinja" if info["chat_template"] else "none (the server renders ChatML)")
    )
    typer.echo("provenance:")
    for k, v in info["provenance"].items():
        typer.echo(f"  {k:<16} {v}")
    typer.echo("files:")
    for name, size in info["files"].items():
        typer.echo(f"  {name:<20} {size / 2**20:>10.2f} MiB")


@app.command()
def init(
    preset: str = typer.Option(
        ..., help=f"Model preset from configs/models/ ({', '.join(preset_names())})."
    ),
    tokenizer: Path = typer.Option(
        ..., help="Tokenizer file or folder (its vocabulary size sets the embedding rows)."
    ),
    output: Path = typer.Option(..., help="Checkpoint directory to write."),
    seed: int = typer.Option(0, help="Seed for the random initialisation."),
) -> None:
    """Write a randomly initialised checkpoint from a preset.

    Example: atlas checkpoint init --preset gpt2-tiny --tokenizer tok/ --output ckpt/
    """
    with user_errors():
        tok = Tokenizer.from_file(tokenizer)
        config = load_preset(preset, vocab_size=tok.vocab_size)
        torch.manual_seed(seed)
        model = Transformer(config)
        save_checkpoint(
            output, model, tok, {"source": f"atlas checkpoint init --preset {preset}", "seed": seed}
        )
    typer.echo(f"wrote {output} ({_human(model.num_parameters())} parameters, preset {preset})")


@app.command()
def migrate(
    directory: Path = typer.Argument(..., help="Checkpoint directory, changed in place."),
) -> None:
    """Bring an older checkpoint to the current layout (v1 -> v2: the Atlas tokenizer file
    becomes atlas_tokenizer.json). Older checkpoints load without it; this makes it official.

    Example: atlas checkpoint migrate runs/old/checkpoint
    """
    with user_errors():
        changed = migrate_checkpoint(directory)
    version = read_metadata(directory)["format_version"]
    typer.echo(f"{'migrated' if changed else 'already current:'} {directory} (format v{version})")


@app.command("import-hf")
def import_hf_command(
    src: str = typer.Argument(
        ...,
        help="Local Hugging Face model folder (config.json + safetensors), or a hub repository "
        "id such as gpt2 or HuggingFaceTB/SmolLM2-135M (HF_HUB_OFFLINE=1: the cache only).",
    ),
    dst: Path = typer.Argument(..., help="Atlas checkpoint directory to write."),
    revision: str = typer.Option(
        None, help="Hub branch, tag or commit (hub repositories only; default main)."
    ),
    tokenizer: Path = typer.Option(
        None, help="Use this tokenizer file instead of SRC's (Atlas or HF byte-level BPE)."
    ),
) -> None:
    """Convert a Hugging Face GPT-2 or Llama model into an atlas checkpoint.

    Example: atlas checkpoint import-hf HuggingFaceTB/SmolLM2-135M checkpoints/smollm2
    """
    from ..hf_import import import_hf

    with user_errors():
        path = import_hf(src, dst, str(tokenizer) if tokenizer else None, revision)
    typer.echo(f"wrote {path}")


@app.command("export-hf")
def export_hf_command(
    directory: Path = typer.Argument(..., help="Atlas checkpoint directory."),
    out: Path = typer.Argument(
        ..., help="Folder to write (transformers' from_pretrained reads it)."
    ),
    dtype: str = typer.Option("float32", help="Weight dtype: float32, bfloat16 or float16."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUT."),
) -> None:
    """Write a Hugging Face model folder: weights, config, tokenizer.json, chat template.

    Example: atlas checkpoint export-hf runs/quickstart/checkpoint hf/quickstart
    """
    from ..hf_export import export_hf

    with user_errors():
        path = export_hf(directory, out, dtype, overwrite)
    typer.echo(f"wrote {path}")


@app.command("export-gguf")
def export_gguf_command(
    directory: Path = typer.Argument(..., help="Atlas checkpoint directory."),
    out: Path = typer.Argument(..., help="GGUF file to write (llama.cpp runs it)."),
    tensor_type: str = typer.Option(
        "f32", "--type", help="Matrices as f32, f16 or q8_0 (norms and biases stay f32)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT."),
) -> None:
    """Write a GGUF file for llama.cpp: weights, hyper-parameters, tokenizer, chat template.

    Example: atlas checkpoint export-gguf runs/quickstart/checkpoint quickstart-q8_0.gguf --type q8_0
    """
    from ..gguf_export import GGUF_TYPES, GGUFExportError, export_gguf

    with user_errors(FileExistsError):
        if tensor_type not in GGUF_TYPES:
            raise GGUFExportError(f"--type {tensor_type!r}: choose one of {list(GGUF_TYPES)}")
        if out.exists() and not overwrite:
            raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
        path = export_gguf(directory, out, tensor_type, progress=True)
    typer.echo(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {tensor_type})")
