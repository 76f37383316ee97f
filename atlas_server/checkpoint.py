"""The Atlas checkpoint: a directory the trainer writes and the server reads.

Layout (format version 3):
    config.json           {"format": "atlas-checkpoint", "format_version": 3,
                           "model": {ModelConfig fields},
                           "tokenizer": {"file", "sha256", "vocab_size"},
                           "weights": {"sha256"},
                           "provenance": {"created_by", "created_at", "source", "step", ...}}
    model.safetensors     the weights, named as in `Transformer.state_dict()`
    atlas_tokenizer.json  the Atlas tokenizer
    chat_template.jinja   optional: the model's own chat template (Jinja text, as Hugging
                          Face saves it); without one the server renders ChatML

Lineage (in "provenance", plain JSON, so older readers ignore it): `stage` (pretrain, sft,
dpo, merge-lora, import), `base_checkpoint` / `base_checkpoint_sha256` (the checkpoint this
one was trained from, and the sha256 of its model.safetensors), `data_sha256` (the hash of
the data it was trained on), and `lineage`: the whole chain, oldest first, each link with
its stage, data hash and the weights hash of the checkpoint it produced (the last link's
is this checkpoint's own file). A checkpoint saved before lineage existed has none; its
chain is one link inferred from its provenance (`lineage()`), so it still loads and can
still be a base.

Version 1 named the tokenizer `tokenizer.json`, the name Hugging Face `tokenizers` files
have, although it is in Atlas's format. Version 2 records no hash of the weights. Both load
as they are (config.json names the tokenizer file; weights without a recorded hash load
unchecked); `migrate_checkpoint` (`atlas checkpoint migrate`) renames the tokenizer and
records the hash of the weights file as it is now, in place.

What it does: save (atomically: written into a sibling temp directory, then renamed),
load (safetensors only, never unpickling), validate (every tensor present with the right
shape, no unknown config keys, no newer format, the tokenizer and the weights still the
files whose sha256 config.json records: a changed tokenizer or a damaged weights file is
refused, not warned about), migrate and describe a checkpoint. The weights' hash costs a
read of the file at load. What it does not do: trainer state (optimizer, data position; see
`trainer/state.py`) or format conversion (see `hf_import.py`, `hf_export.py`).
"""

from __future__ import annotations

import datetime as _dt
import getpass
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .io import atomic_directory, atomic_write_text
from .model import ConfigError, ModelConfig, Transformer
from .tokenizer import TOKENIZER_FILE, Tokenizer, TokenizerError

FORMAT_NAME = "atlas-checkpoint"
FORMAT_VERSION = 3
CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE = "config.json", "model.safetensors", TOKENIZER_FILE
CHAT_TEMPLATE_FILE = "chat_template.jinja"
V1_TOKENIZER_FILE = "tokenizer.json"  # version 1's name for the Atlas tokenizer

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


@dataclass
class Checkpoint:
    model: Transformer
    tokenizer: Tokenizer
    config: ModelConfig
    path: Path
    provenance: dict[str, Any] = field(default_factory=dict)
    chat_template: str | None = None  # chat_template.jinja, when the checkpoint has one


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(
    directory: str | os.PathLike,
    model: Transformer,
    tokenizer: Tokenizer,
    provenance: dict[str, Any] | None = None,
    chat_template: str | None = None,
) -> Path:
    """Write an atlas checkpoint; an existing directory is replaced only once the new one is whole.

    `chat_template` (Jinja text) is stored as chat_template.jinja for the server to render.
    """
    directory = Path(directory)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise CheckpointError(
            f"tokenizer has {tokenizer.vocab_size} ids but the model only {model.config.vocab_size} embeddings"
        )
    with atomic_directory(directory) as tmp:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        tokenizer.save(tmp / TOKENIZER_FILE)
        if chat_template is not None:
            (tmp / CHAT_TEMPLATE_FILE).write_text(chat_template, encoding="utf-8")
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "model": model.config.to_dict(),
            "tokenizer": {
                "file": TOKENIZER_FILE,
                "sha256": sha256_file(tmp / TOKENIZER_FILE),
                "vocab_size": tokenizer.vocab_size,
            },
            "weights": {"sha256": sha256_file(tmp / WEIGHTS_FILE)},
            "provenance": {
                "created_by": f"atlas {_atlas_version()}",
                "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "user": _user(),
                **(provenance or {}),
            },
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


# --- lineage ------------------------------------------------------------------------------------
STAGES = ("pretrain", "sft", "dpo", "merge-lora", "import")
# What `import-hf` records about the source tokenizer's special ids (hf_export.special_ids
# reads them). A checkpoint made from a base keeps the base's tokenizer, so it keeps these:
# without them a fine-tuned Llama 3 Instruct would stop on <|end_of_text|> alone (found by
# name), not on its <|eot_id|>, and be served without its BOS.
TOKENIZER_ID_KEYS = ("bos_token_id", "eos_token_id", "tokenizer_eos_token_id", "tokenizer_adds")


def infer_stage(provenance: dict[str, Any]) -> str:
    """The stage a checkpoint's provenance records, or the best guess for one saved before
    stages were recorded."""
    stage = provenance.get("stage")
    if isinstance(stage, str):
        return stage
    if "imported_from" in provenance or "architecture" in provenance:
        return "import"
    if provenance.get("source") == "atlas-train":
        return "pretrain"
    return "unknown"


def lineage(provenance: dict[str, Any]) -> list[dict[str, Any]]:
    """The chain of stages that made a checkpoint, oldest first (see the module docstring)."""
    chain = provenance.get("lineage")
    if isinstance(chain, list) and chain and all(isinstance(e, dict) for e in chain):
        return [dict(e) for e in chain]
    entry: dict[str, Any] = {"stage": infer_stage(provenance)}
    for key in ("source", "step", "data"):
        if key in provenance:
            entry[key] = provenance[key]
    data_hash = provenance.get("data_sha256") or provenance.get("data_manifest_sha256")
    if data_hash:
        entry["data_sha256"] = data_hash
    return [entry]


def lineage_provenance(
    stage: str, base: str | os.PathLike | None, data: Any, data_sha256: str, **fields: Any
) -> dict[str, Any]:
    """Provenance fields for a checkpoint made by `stage` from `base` (None: from scratch)
    on data hashing to `data_sha256`; `fields` (step, ...) go into its link of the chain.
    The base's recorded special ids (TOKENIZER_ID_KEYS) carry over."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; one of {STAGES}")
    link: dict[str, Any] = {"stage": stage, "data": data, "data_sha256": data_sha256, **fields}
    chain: list[dict[str, Any]] = []
    out: dict[str, Any] = {"stage": stage, "data_sha256": data_sha256}
    if base is not None:
        base = Path(base)
        base_meta = read_metadata(base)
        base_sha = weights_sha256_of(base)
        base_provenance = base_meta.get("provenance") or {}
        chain = lineage(base_provenance)
        out.update({k: base_provenance[k] for k in TOKENIZER_ID_KEYS if k in base_provenance})
        chain[-1] = {**chain[-1], "checkpoint": str(base), "checkpoint_sha256": base_sha}
        out["base_checkpoint"] = str(base)
        out["base_checkpoint_sha256"] = base_sha
    out["lineage"] = [*chain, link]
    return out


def weights_sha256_of(directory: str | os.PathLike) -> str:
    """sha256 of a checkpoint's model.safetensors (what `sha256sum` prints for it)."""
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    return sha256_file(path)


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """Parse and check config.json (format, version, model keys) without touching weights."""
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory; an atlas checkpoint is a folder")
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        if (directory / "adapter.json").is_file():  # trainer/lora.py's adapter checkpoint
            raise CheckpointError(
                f"{directory} holds a LoRA adapter, not a model; merge it into its base "
                "first: atlas checkpoint merge-lora BASE ADAPTER OUT"
            ) from None
        raise CheckpointError(f"{path} is missing; is {directory} an atlas checkpoint?") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CheckpointError(
            f"{path} is not an atlas checkpoint config (format={meta.get('format') if isinstance(meta, dict) else None!r});"
            " Hugging Face checkpoints are converted with `atlas checkpoint import-hf`"
        )
    version = meta.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {json.dumps(version)}; this Atlas reads versions 1 "
            f"to {FORMAT_VERSION} (an integer)"
        )
    known = {"format", "format_version", "model", "tokenizer", "weights", "provenance"}
    unknown = sorted(set(meta) - known)
    if unknown:
        raise CheckpointError(f"{path} has unknown top-level keys {unknown}")
    for key in ("model", "tokenizer", "provenance"):
        # Read as objects everywhere (.get on each); anything else is a damaged file.
        if key in meta and not isinstance(meta[key], dict):
            raise CheckpointError(
                f'{path}: "{key}" must be a JSON object, not {json.dumps(meta[key])[:80]}'
            )
    weights = meta.get("weights", {})
    recorded = weights.get("sha256") if isinstance(weights, dict) else None
    if not isinstance(weights, dict) or not (
        recorded is None or (isinstance(recorded, str) and re.fullmatch(r"[0-9a-f]{64}", recorded))
    ):
        raise CheckpointError(
            f'{path}: "weights" must be {{"sha256": "<64 hex digits>"}}, not {json.dumps(weights)[:80]}'
        )
    try:
        ModelConfig.from_dict(meta.get("model") or {})
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path}: invalid model config: {e}") from None
    return meta


def load_checkpoint(
    directory: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
    **config_overrides: Any,
) -> Checkpoint:
    """Load an atlas checkpoint. `config_overrides` may change runtime-only fields (attention, dropout).

    The model comes back in eval mode but not `prepare_for_inference()`d: that copy of a tied
    head costs vocab x d_model numbers the trainer does not want; servers call it themselves.
    """
    directory = Path(directory)
    meta = read_metadata(directory)
    runtime_only = {"attention", "dropout"}
    bad = sorted(set(config_overrides) - runtime_only)
    if bad:
        raise CheckpointError(
            f"only {sorted(runtime_only)} may be overridden at load time, not {bad}"
        )
    config = ModelConfig.from_dict({**meta["model"], **config_overrides})
    tok_path = tokenizer_path(directory, meta)
    _check_tokenizer_hash(tok_path, meta.get("tokenizer", {}).get("sha256"))
    try:
        tokenizer = Tokenizer.from_file(tok_path)
    except TokenizerError as e:
        raise CheckpointError(f"{tok_path}: {e}") from None
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"{tok_path} has {tokenizer.vocab_size} ids but the model only {config.vocab_size} embeddings"
        )
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise CheckpointError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    with torch.device("meta"):
        model = Transformer(config)
    state = _read_weights(directory / WEIGHTS_FILE, model)
    # After the names and shapes, which say more about a wrong file than a hash does.
    _check_weights_hash(directory / WEIGHTS_FILE, (meta.get("weights") or {}).get("sha256"))
    model.to_empty(device=device)
    model.load_state_dict(state, strict=True, assign=False)
    model._rebuild_buffers()  # non-persistent tables (RoPE, sinusoid) were on the meta device
    model.to(dtype=dtype)
    model.eval()
    template_path = directory / CHAT_TEMPLATE_FILE
    try:
        chat_template = (
            template_path.read_text(encoding="utf-8") if template_path.is_file() else None
        )
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{template_path} is not UTF-8 text: {e}") from None
    return Checkpoint(
        model, tokenizer, config, directory, meta.get("provenance", {}), chat_template
    )


def tokenizer_path(directory: Path, meta: dict[str, Any]) -> Path:
    """The tokenizer file config.json names (version 1 default: tokenizer.json)."""
    default = TOKENIZER_FILE if meta.get("format_version", 1) >= 2 else V1_TOKENIZER_FILE
    name = (meta.get("tokenizer") or {}).get("file", default)
    if Path(name).name != name:
        raise CheckpointError(
            f"{directory / CONFIG_FILE}: tokenizer file {name!r} is not a plain name"
        )
    return directory / name


def text_adds_of(tokenizer_file: str | os.PathLike) -> tuple[list[int], list[int]]:
    """(ids before, ids after) that the model reading this tokenizer's ids expects around
    every text: an HF tokenizer.json's post-processor (Llama 3's <|begin_of_text|>), or
    what `import-hf` recorded in the checkpoint holding an Atlas tokenizer file; ([], [])
    for any other tokenizer, since Atlas's own `encode()` adds nothing. Whichever file of
    the same model is given (the HF folder's, the checkpoint's), the answer is the same."""
    from .tokenizer.hf_format import post_processor_ids

    path = Path(tokenizer_file)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return [], []  # loading the tokenizer reports the file
    if isinstance(data, dict) and "model" in data and "pre_tokenizer" in data:  # HF format
        try:
            return post_processor_ids(data)
        except TokenizerError:
            return [], []  # a post-processor HF import refuses: loading says why
    try:
        provenance = read_metadata(path.parent).get("provenance") or {}
    except (CheckpointError, OSError):
        return [], []  # not inside an atlas checkpoint
    adds = provenance.get("tokenizer_adds") or {}
    if not isinstance(adds, dict):
        return [], []  # a damaged record: the server's special_ids ignores it too
    ids = [adds.get(side) or [] for side in ("before", "after")]
    if not all(isinstance(v, list) and all(type(i) is int for i in v) for v in ids):
        return [], []  # a damaged record: the server's special_ids ignores it too
    return ids[0], ids[1]


def migrate_checkpoint(directory: str | os.PathLike) -> bool:
    """Bring a checkpoint to the current format in place; False if it already was.

    Version 1 -> 2: the Atlas tokenizer moves from tokenizer.json to atlas_tokenizer.json.
    Version 2 -> 3: config.json records the sha256 of model.safetensors as it is now (the
    file must still match the config's tensors: it is read as a load would).
    Every step leaves a loadable checkpoint: the new name is linked first, config.json is
    replaced atomically to point at it, and only then the old name is removed. A current
    checkpoint is only checked: its files must match the hashes config.json records.
    """
    directory = Path(directory)
    meta = read_metadata(directory)
    if meta["format_version"] >= FORMAT_VERSION:
        # "Already current" must not vouch for damaged files: check what load would check.
        recorded = (meta.get("tokenizer") or {}).get("sha256")
        _check_tokenizer_hash(tokenizer_path(directory, meta), recorded)
        _check_weights_hash(directory / WEIGHTS_FILE, (meta.get("weights") or {}).get("sha256"))
        return False
    old = tokenizer_path(directory, meta)
    _check_tokenizer_hash(old, (meta.get("tokenizer") or {}).get("sha256"))
    new = directory / TOKENIZER_FILE
    if old != new:
        if not old.is_file():
            raise CheckpointError(f"{old} is missing; nothing to migrate")
        new.unlink(missing_ok=True)
        try:
            os.link(old, new)
        except OSError:  # a filesystem without hard links
            shutil.copy2(old, new)
    tokenizer_meta = {**(meta.get("tokenizer") or {}), "file": TOKENIZER_FILE}
    tokenizer_meta.setdefault("sha256", sha256_file(new))
    weights = directory / WEIGHTS_FILE
    with torch.device("meta"):  # the tensors' names and shapes, before the file is vouched for
        _read_weights(weights, Transformer(ModelConfig.from_dict(meta["model"])), header_only=True)
    meta = {
        **meta,
        "format_version": FORMAT_VERSION,
        "tokenizer": tokenizer_meta,
        "weights": {"sha256": sha256_file(weights)},
    }
    atomic_write_text(directory / CONFIG_FILE, json.dumps(meta, indent=2) + "\n")
    if old != new:
        old.unlink()
    return True


def _check_tokenizer_hash(path: Path, recorded: str | None) -> None:
    # Refuse rather than warn: the weights were trained on the ids of the recorded
    # tokenizer, and a changed vocabulary silently turns every prompt into other tokens.
    # A deliberate edit is made official by re-saving the checkpoint (save_checkpoint).
    if recorded is None or not path.is_file():
        return  # absent hash (hand-made config): nothing to compare; a missing file fails later
    actual = sha256_file(path)
    if actual != recorded:
        raise CheckpointError(
            f"{path} changed since the checkpoint was saved (sha256 {actual[:12]}..., config.json "
            f"records {recorded[:12]}...); the model was trained on the recorded tokenizer: restore "
            "it, or re-save the checkpoint if the change is deliberate"
        )


def _check_weights_hash(path: Path, recorded: str | None) -> None:
    # Refuse: a weights file that changed after the save (a flipped bit, a partial copy, a
    # file from another run dropped in) still has the right names and shapes, and would
    # serve wrong numbers without a word.
    if recorded is None:
        return  # a version 2 checkpoint, or a hand-made config: nothing to compare
    actual = sha256_file(path)
    if actual != recorded:
        raise CheckpointError(
            f"{path} changed since the checkpoint was saved (sha256 {actual[:12]}..., config.json "
            f"records {recorded[:12]}...): the file is damaged or was replaced; restore it, or "
            "re-save the checkpoint if the change is deliberate"
        )


def _read_weights(
    path: Path, model: Transformer, header_only: bool = False
) -> dict[str, torch.Tensor]:
    """The tensors of `path`, checked by name and shape against `model`'s; with
    `header_only`, only the check (nothing is read past the header)."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names = set(f.keys())
            missing = sorted(set(expected) - names)
            unexpected = sorted(names - set(expected))
            if missing or unexpected:
                raise CheckpointError(
                    f"{path}: tensors do not match the config: missing {missing[:5]}"
                    f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                    f"{'...' if len(unexpected) > 5 else ''}"
                )
            state = {}
            for name in sorted(names):
                shape = tuple(f.get_slice(name).get_shape())
                if shape != expected[name]:
                    raise CheckpointError(
                        f"{path}: tensor {name} has shape {list(shape)}, the config needs {list(expected[name])}"
                    )
                if not header_only:
                    state[name] = f.get_tensor(name)
            return state
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None


def _atlas_version() -> str:
    try:
        from importlib.metadata import version

        return version("atlas-llm")
    except Exception:
        return "unknown"


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"
