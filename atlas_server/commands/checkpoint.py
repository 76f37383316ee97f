"""`atlas checkpoint`: inspect, create, migrate, import and export atlas checkpoints.

What it does: `inspect DIR` (parameter counts, config, tokenizer, chat template, what it was
imported from, provenance, its lineage chain: pretrain -> sft -> dpo with each link's data
and weights hashes, file sizes; `--json` for scripts; a LoRA adapter directory too),
`merge-lora BASE ADAPTER OUT` (a plain checkpoint whose projections hold base + adapter,
which `atlas serve` serves like any other), `init --preset NAME
--tokenizer FILE --output DIR` (a randomly initialised model whose vocabulary matches the
tokenizer), `migrate DIR` (an older checkpoint layout to the current one, in place),
`import-hf SRC DST` (a Hugging Face folder or hub repository), `import-gguf FILE DST` (a
llama.cpp GGUF file), `export-hf DIR OUT` (a folder `transformers` loads) and
`export-gguf DIR OUT.gguf` (a file llama.cpp runs).
What it does not do: training (see `atlas-train`).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from ..model import load_preset, preset_names
from ..tokenizer import Tokenizer
from ._common import user_errors

# PyTorch and the checkpoint code are imported inside the commands that use them: `atlas
# --help` and `atlas tokenizer ...` register these commands, and started in ~2.4 s with
# PyTorch loaded at import against ~0.4 s without it.
if TYPE_CHECKING:
    from ..model import Transformer

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


def chain_of(directory: Path, provenance: dict, own_sha256: str) -> list[dict]:
    """The lineage chain, oldest first, its last link completed with this checkpoint's hash."""
    from ..checkpoint import lineage

    chain = lineage(provenance)
    chain[-1] = {**chain[-1], "checkpoint": str(directory), "checkpoint_sha256": own_sha256}
    return chain


def describe_adapter(directory: Path) -> dict:
    from trainer.lora import load_adapter

    from ..checkpoint import sha256_file

    adapter = load_adapter(directory)
    own = sha256_file(directory / "adapter.safetensors")
    return {
        "path": str(directory),
        "kind": "lora-adapter",
        "lora": {
            "rank": adapter.config.rank,
            "alpha": adapter.config.alpha,
            "dropout": adapter.config.dropout,
            "targets": list(adapter.config.targets),
            "modules": len(adapter.modules),
            "parameters": sum(t.numel() for t in adapter.tensors.values()),
        },
        "base_weights_sha256": adapter.base_sha256,
        "lineage": chain_of(directory, adapter.provenance, own),
        "provenance": adapter.provenance,
        "files": {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file()},
    }


def describe(directory: Path) -> dict:
    from ..checkpoint import load_checkpoint, read_metadata, weights_sha256_of

    if not (directory / "config.json").is_file() and (directory / "adapter.json").is_file():
        return describe_adapter(directory)
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
        "lineage": chain_of(directory, provenance, weights_sha256_of(directory)),
        "files": files,
    }


def _short(value: object) -> str:
    return str(value)[:12] if value else "-"


def show_lineage(chain: list[dict]) -> None:
    typer.echo("lineage (oldest first; data and weights sha256, first 12 hex digits):")
    for i, link in enumerate(chain, 1):
        step = f"step {link['step']}" if "step" in link else ""
        data = link.get("data")
        if isinstance(data, dict):
            data = ", ".join(data.get("sources") or [])
        here = " (this)" if i == len(chain) else ""
        typer.echo(
            f"  {i}. {link.get('stage', '?'):<10} {step:<10} data {_short(link.get('data_sha256'))}"
            f"  weights {_short(link.get('checkpoint_sha256'))}  {link.get('checkpoint', '')}{here}"
        )
        if data:
            typer.echo(f"     {'':<10} {'':<10} from {data}")


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

    Example: atlas checkpoint inspect ~/.cache/atlas/quickstart/checkpoint
    """
    with user_errors():
        info = describe(directory)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    if info.get("kind") == "lora-adapter":
        lora = info["lora"]
        typer.echo(f"LoRA adapter {info['path']}")
        typer.echo(
            f"rank {lora['rank']}, alpha {lora['alpha']:g}, dropout {lora['dropout']:g} on "
            f"{lora['modules']} projections ({', '.join(lora['targets'])}): "
            f"{lora['parameters']:,} parameters"
        )
        # Over the tensors (names, dtypes, shapes, values), so that a base re-saved or
        # loaded in another file still matches; not what `sha256sum model.safetensors` prints.
        typer.echo(f"base weights sha256 (of the tensors): {info['base_weights_sha256']}")
        show_lineage(info["lineage"])
        typer.echo("merge for serving: atlas checkpoint merge-lora BASE ADAPTER OUT")
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
        if k != "lineage":
            typer.echo(f"  {k:<16} {v}")
    show_lineage(info["lineage"])
    typer.echo("files:")
    width = max((len(name) for name in info["files"]), default=0)  # trainer_state.safetensors
    for name, size in info["files"].items():
        typer.echo(f"  {name:<{width}} {size / 2**20:>10.2f} MiB")


@app.command("merge-lora")
def merge_lora_command(
    base: Path = typer.Argument(..., help="The base checkpoint the adapter was trained on."),
    adapter: Path = typer.Argument(
        ..., help="A LoRA adapter directory (a LoRA run's RUN/checkpoints/step_NNNNNN)."
    ),
    out: Path = typer.Argument(..., help="Checkpoint directory to write."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT."),
) -> None:
    """Merge a LoRA adapter into its base: W + A @ B * alpha / rank, a plain checkpoint.

    The base must be the weights the adapter was trained on (their sha256 is checked).
    OUT keeps the base's tokenizer and chat template and records the lineage.

    Example: atlas checkpoint merge-lora quickstart/checkpoint runs/sft-lora/checkpoints/step_000120 sft-merged
    """
    from trainer.lora import LoRAError, load_adapter, merge_lora

    from ..checkpoint import (
        TOKENIZER_ID_KEYS,
        lineage_provenance,
        load_checkpoint,
        save_checkpoint,
        sha256_file,
        weights_sha256_of,
    )

    with user_errors(LoRAError, FileExistsError):
        if out.exists() and not overwrite:
            raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
        check_output(out, overwrite, inputs=[base, adapter])
        ckpt = load_checkpoint(base)
        lora = load_adapter(adapter)
        merged = merge_lora(ckpt.model, lora)
        adapter_sha256 = sha256_file(adapter / "adapter.safetensors")
        source = lora.provenance
        if source.get("lineage"):  # the stage that trained the adapter, now merged
            chain = [dict(link) for link in source["lineage"]]
            chain[-1] = {**chain[-1], "adapter": str(adapter), "adapter_sha256": adapter_sha256}
            fields = {
                "stage": source.get("stage", chain[-1].get("stage")),
                "data_sha256": source.get("data_sha256"),
                "base_checkpoint": str(base),
                "base_checkpoint_sha256": weights_sha256_of(base),
                "lineage": chain,
            }
        else:  # an adapter saved without lineage: the merge is the stage on record
            fields = lineage_provenance("merge-lora", base, str(adapter), adapter_sha256)
        # The merged model keeps the base's tokenizer, so it keeps the ids recorded about it
        # (an imported Llama 3's BOS and EOS ids), whichever branch made `fields`.
        recorded = {k: ckpt.provenance[k] for k in TOKENIZER_ID_KEYS if k in ckpt.provenance}
        provenance = {
            **recorded,
            "source": "atlas checkpoint merge-lora",
            "adapter": str(adapter),
            "adapter_sha256": adapter_sha256,
            "lora": {"rank": lora.config.rank, "alpha": lora.config.alpha},
            **fields,
        }
        save_checkpoint(out, merged.eval(), ckpt.tokenizer, provenance, ckpt.chat_template)
    typer.echo(
        f"wrote {out}: {base} + {len(lora.modules)} LoRA projections (rank {lora.config.rank})"
    )


def _is_gguf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"  # the format's magic


def check_output(out: Path, overwrite: bool, inputs: list[Path], folder: bool = True) -> None:
    """Refuse to replace a non-empty OUT unless asked, and never an input, --overwrite or
    not: not OUT equal to an input, nor a folder holding one (the writers replace OUT
    whole, so `export-hf ck ck` or `merge-lora base run/checkpoints/step_8 run` would delete
    what they read), nor, for a file OUT, an existing file inside an input folder (its
    weights; an earlier GGUF export there may be replaced). Symlinks are resolved first. `folder`: OUT is a folder (--overwrite replaces
    folders, never a file), else a file (a folder is refused)."""
    from ..checkpoint import CheckpointError

    target = out.resolve()
    for given in inputs:
        if not Path(given).exists():  # a hub repository id
            continue
        source = Path(given).resolve()
        if target == source:
            raise CheckpointError(f"{out} is an input; write the output elsewhere")
        if target in source.parents:
            raise CheckpointError(f"{out} holds the input {given}; write the output elsewhere")
        if not folder and out.is_file() and source in target.parents and not _is_gguf(out):
            # an earlier export may be replaced; the checkpoint's own files may not
            raise CheckpointError(f"{out} is part of the input {given}; write the output elsewhere")
    if not folder:
        if out.is_dir():
            raise FileExistsError(f"{out} is a folder; give the path of the .gguf file to write")
        if out.exists() and not overwrite:
            raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
        return
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder; write the checkpoint elsewhere")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; pass --overwrite to replace it")


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
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUTPUT."),
) -> None:
    """Write a randomly initialised checkpoint from a preset.

    Example: atlas checkpoint init --preset gpt2-tiny --tokenizer tok/ --output ckpt/
    """
    import torch

    from ..checkpoint import save_checkpoint
    from ..model import Transformer

    with user_errors(FileExistsError):
        check_output(output, overwrite, inputs=[tokenizer])
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
    becomes atlas_tokenizer.json; v2 -> v3: config.json records the weights file's sha256,
    which every later load checks). Older checkpoints load without it; this makes it official.

    Example: atlas checkpoint migrate runs/old/checkpoint
    """
    from ..checkpoint import migrate_checkpoint, read_metadata

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
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty DST."),
) -> None:
    """Convert a Hugging Face GPT-2, Llama, Qwen2 or GPT-NeoX model into an atlas checkpoint.

    Example: atlas checkpoint import-hf HuggingFaceTB/SmolLM2-135M checkpoints/smollm2
    """
    from ..checkpoint import read_metadata
    from ..hf_import import import_hf

    with user_errors(FileExistsError):
        check_output(dst, overwrite, inputs=[Path(src), *([tokenizer] if tokenizer else [])])
        path = import_hf(src, dst, str(tokenizer) if tokenizer else None, revision)
        adds = read_metadata(path)["provenance"].get("tokenizer_adds")
    typer.echo(f"wrote {path}")
    _note_tokenizer_adds(adds)


def _note_tokenizer_adds(adds: dict | None) -> None:
    if adds:  # Llama 3's BOS: the model expects it, and Atlas's encode() does not add it
        where = [f"id {adds[k]} {k}" for k in ("before", "after") if adds[k]]
        typer.echo(
            f"note: the source tokenizer adds {' and '.join(where)} every text; `atlas "
            "serve` adds them to text prompts and export-hf and export-gguf put them back, "
            "but Atlas's encode() does not (add them yourself when you call it)",
            err=True,
        )


@app.command("import-gguf")
def import_gguf_command(
    src: Path = typer.Argument(..., help="GGUF file (llama.cpp's format) to convert."),
    dst: Path = typer.Argument(..., help="Atlas checkpoint directory to write."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty DST."),
) -> None:
    """Convert a GGUF file (llama.cpp's gpt2, llama, qwen2 or gptneox; F32, F16, BF16 or Q8_0
    tensors; a byte-level BPE tokenizer) into an atlas checkpoint.

    Example: atlas checkpoint import-gguf quickstart-q8_0.gguf checkpoints/quickstart-q8_0
    """
    from ..checkpoint import read_metadata
    from ..gguf_import import import_gguf

    with user_errors(FileExistsError):
        check_output(dst, overwrite, inputs=[src])
        path = import_gguf(src, dst)
        adds = read_metadata(path)["provenance"].get("tokenizer_adds")
    typer.echo(f"wrote {path}")
    _note_tokenizer_adds(adds)


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

    Example: atlas checkpoint export-hf ~/.cache/atlas/quickstart/checkpoint hf/quickstart
    """
    from ..hf_export import export_hf

    with user_errors(FileExistsError):
        check_output(out, overwrite, inputs=[directory])
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

    Example: atlas checkpoint export-gguf ~/.cache/atlas/quickstart/checkpoint quickstart-q8_0.gguf --type q8_0
    """
    from ..gguf_export import GGUF_TYPES, GGUFExportError, export_gguf

    with user_errors(FileExistsError):
        if tensor_type not in GGUF_TYPES:
            raise GGUFExportError(f"--type {tensor_type!r}: choose one of {list(GGUF_TYPES)}")
        # --overwrite replaces a file; a folder is not a GGUF to replace
        check_output(out, overwrite, inputs=[directory], folder=False)
        path = export_gguf(directory, out, tensor_type, progress=True)
    typer.echo(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {tensor_type})")
