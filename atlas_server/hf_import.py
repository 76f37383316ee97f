"""Convert a Hugging Face model (a local folder or a hub repository) into an atlas checkpoint.

What it does: finds the model (a local folder, or `org/name` fetched with
`huggingface_hub.snapshot_download` into the usual hub cache; `HF_HUB_OFFLINE=1` reads the
cache only), reads `config.json` and the safetensors weights (single file or sharded with
`model.safetensors.index.json`) directly — no `transformers` import — maps every tensor to
Atlas's names and layouts (`hf_arch.py`), converts the byte-level BPE `tokenizer.json`,
keeps the chat template (`tokenizer_config.json`'s `chat_template` or
`chat_template.jinja`) as the checkpoint's `chat_template.jinja`, and writes an atlas
checkpoint whose provenance names the source, revision and architecture, the model's own
bos/eos ids and what its tokenizer's post-processor adds around each text (Llama 3's BOS,
which Atlas's encode does not add), for the exports to write back. Every tensor of the
weights must be used, and shard paths stay inside the folder.
What it does not do: pickled `.bin` weights (never unpickled: convert them to safetensors
first), rope scaling, or SentencePiece tokenizers (pass `--tokenizer FILE`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .checkpoint import save_checkpoint
from .hf_arch import (
    ARCHITECTURES,
    GPT2_BLOCK_NAMES,
    HFConversionError,
    atlas_state_from_hf,
    model_config_from_hf,
    untie_if_head_differs,
)
from .model import Transformer
from .tokenizer import Tokenizer, TokenizerError
from .tokenizer.hf_format import post_processor_ids, tokenizer_from_hf_json

__all__ = [
    "GPT2_BLOCK_NAMES",
    "HFImportError",
    "HFSource",
    "hf_to_atlas_model",
    "import_hf",
    "load_hf_weights",
    "model_config_from_hf",
    "model_from_hf_tensors",
    "resolve_source",
    "special_token_ids",
]

# One error type for both directions; the import side keeps its own name.
HFImportError = HFConversionError

# What a conversion reads from a hub repository; everything else (pickles, ONNX, GGUF,
# other frameworks' weights) stays on the hub.
HUB_FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


@dataclass(frozen=True)
class HFSource:
    """Where a model was found: the local folder to read, and what to record about it."""

    path: Path
    name: str  # the repository id, or the folder's name
    provenance: dict[str, Any] = field(default_factory=dict)


def resolve_source(src: str | os.PathLike, revision: str | None = None) -> HFSource:
    """A local folder as it is, else a hub repository id fetched into the hub cache."""
    path = Path(src)
    if path.is_dir():
        if revision is not None:
            raise HFImportError(f"--revision applies to hub repositories, and {src} is a folder")
        return HFSource(path, path.resolve().name, {"source": f"huggingface:{path.resolve()}"})
    text = str(src)
    if not _REPO_ID.match(text) or text.startswith(("./", "../")):
        raise HFImportError(f"{src} is not a directory (nor a hub repository id like org/name)")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:
        raise HFImportError(
            f"{src} is not a local folder, and fetching it from the hub needs huggingface_hub: "
            "pip install 'atlas-llm[hub]'"
        ) from None
    try:
        local = Path(snapshot_download(text, revision=revision, allow_patterns=HUB_FILES))
    except GatedRepoError:
        raise HFImportError(
            f"{text} is gated: accept its licence on huggingface.co and log in "
            "(`hf auth login` or HF_TOKEN)"
        ) from None
    except RepositoryNotFoundError:
        raise HFImportError(f"no hub repository {text} (or it is private)") from None
    except RevisionNotFoundError:
        raise HFImportError(f"{text} has no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        where = "the hub cache (HF_HUB_OFFLINE is set)" if offline else "the hub or its cache"
        raise HFImportError(
            f"{text}{'@' + revision if revision else ''} is not a local folder and not in "
            f"{where}; download it once online, or point SRC at a local folder"
        ) from None
    except OSError as e:  # network failures surface as requests/httpx OSErrors
        raise HFImportError(f"cannot fetch {text} from the hub: {e}") from None
    provenance: dict[str, Any] = {"source": f"hf://{text}", "revision": revision or "main"}
    if re.fullmatch(r"[0-9a-f]{40}", local.name):  # snapshots/<commit>
        provenance["commit"] = local.name
    return HFSource(local, text, provenance)


def _read_config(src: Path) -> dict[str, Any]:
    path = src / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise HFImportError(f"{path} is missing; SRC must be a Hugging Face model folder") from None
    except json.JSONDecodeError as e:
        raise HFImportError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise HFImportError(f"{path} holds a JSON {type(config).__name__}, not an object")
    return config


def load_hf_weights(src: Path) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors or its shards (never a pickle)."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        files = _shards_of(index)
    elif (src / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        pickled = [p.name for p in src.glob("*.bin")]
        hint = (
            f" (found {pickled}: pickled weights are never loaded; re-save with safetensors)"
            if pickled
            else ""
        )
        raise HFImportError(f"no model.safetensors in {src}{hint}")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            with safe_open(str(src / name), framework="pt", device="cpu") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key).float()
        except Exception as e:  # a missing shard or a corrupt header: name the file
            raise HFImportError(f"{src / name} is not a readable safetensors file: {e}") from None
    return tensors


def _shards_of(index: Path) -> list[str]:
    """The shard files an index names, each a file inside the model folder."""
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise HFImportError(f"{index} has no weight_map object of tensor name -> shard file")
    for name in set(weight_map.values()):
        # An index is data from the download: a shard must not point anywhere else. The
        # path is checked as written, not resolved: in the hub cache every shard is a
        # symlink into ../../blobs/, which is where a download puts it.
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise HFImportError(f"{index} names a shard outside the model folder: {name!r}")
    return sorted(set(weight_map.values()))


def hf_to_atlas_model(src: str | os.PathLike) -> Transformer:
    """Build an Atlas Transformer holding the weights of a local HF model folder."""
    src = Path(src)
    hf_config = _read_config(src)
    try:  # refuse an unsupported model before reading its weights
        model_config_from_hf(hf_config)
    except (TypeError, AttributeError) as e:  # a value of the wrong JSON type ("2" for 2)
        raise HFImportError(f"{src / 'config.json'}: a value has the wrong type: {e}") from None
    except KeyError as e:  # a key every model of its type has (hidden_size, n_head, ...)
        kind = hf_config.get("model_type")
        raise HFImportError(
            f"{src / 'config.json'}: missing {e.args[0]!r}, which a {kind} config needs"
        ) from None
    return model_from_hf_tensors(hf_config, load_hf_weights(src))


def model_from_hf_tensors(
    hf_config: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> Transformer:
    """An Atlas Transformer from an HF config.json dict and its state dict (HF names)."""
    config = model_config_from_hf(untie_if_head_differs(hf_config, tensors))
    state = atlas_state_from_hf(hf_config, tensors)
    model = Transformer(config)
    expected = model.state_dict()
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise HFImportError(
                f"{name}: shape {list(tensor.shape)} does not match the config "
                f"({list(expected[name].shape)})"
            )
    model.load_state_dict(state, strict=True)
    return model.eval()


def import_hf(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    tokenizer_file: str | None = None,
    revision: str | None = None,
) -> Path:
    """Convert SRC (a local HF folder or a hub repository id) into an atlas checkpoint at DST."""
    source = resolve_source(src, revision)
    hf_config = _read_config(source.path)
    model = hf_to_atlas_model(source.path)
    tokenizer = _tokenizer_for(source.path, tokenizer_file, source.name)
    model_type = hf_config.get("model_type")
    hf_class = (hf_config.get("architectures") or [ARCHITECTURES[model_type].hf_class])[0]
    provenance = {**source.provenance, "imported_from": model_type, "architecture": hf_class}
    if tokenizer_file is not None:
        provenance["tokenizer"] = str(Path(tokenizer_file).resolve())
    else:
        provenance.update(_tokenizer_adds(source.path / "tokenizer.json"))
    provenance.update(special_token_ids(source.path, hf_config, tokenizer))
    return save_checkpoint(dst, model, tokenizer, provenance, chat_template_of(source.path))


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from an optional file of the model folder ({} when absent)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HFImportError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise HFImportError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


def special_token_ids(
    src: Path, hf_config: dict[str, Any], tokenizer: Tokenizer
) -> dict[str, int | list[int]]:
    """The model's own bos/eos ids, for the exports to write back: generation_config.json's,
    else config.json's, else tokenizer_config.json's token names. An id that is not one of
    the tokenizer's special tokens (transformers' LlamaConfig default of 1 and 2 under a
    GPT-2 vocabulary) is a default nobody chose, and is not kept."""
    generation = _read_json(src / "generation_config.json")
    names = _read_json(src / "tokenizer_config.json")
    known = tokenizer.id_to_special.keys() | tokenizer.id_to_added.keys()
    by_name = {**tokenizer.added_tokens, **tokenizer.special_tokens}
    found: dict[str, int | list[int]] = {}
    for kind in ("bos", "eos"):
        key = f"{kind}_token_id"
        name = names.get(f"{kind}_token")
        if isinstance(name, dict):  # {"content": "<|endoftext|>", ...}
            name = name.get("content")
        for value in (generation.get(key), hf_config.get(key), by_name.get(name)):
            ids = value if isinstance(value, list) else [value]
            if value not in (None, []) and all(type(i) is int and i in known for i in ids):
                found[key] = value
                break
        if kind == "eos" and by_name.get(name) in known:
            # The tokenizer's own eos_token: with several eos ids (Llama 3 Instruct lists
            # <|end_of_text|> and <|eot_id|>), the one tokenizer_config.json and llama.cpp's
            # converter name as *the* eos.
            found["tokenizer_eos_token_id"] = by_name[name]
    return found


def _tokenizer_adds(hf_json: Path) -> dict[str, Any]:
    """{"tokenizer_adds": {"before": ids, "after": ids}} when the tokenizer's post-processor
    adds tokens around each text (Llama 3's BOS); Atlas's encode does not, so this is
    recorded for `import-hf` to say and for the exports to restore."""
    data = _read_json(hf_json)
    try:
        before, after = post_processor_ids(data)
    except TokenizerError as e:
        raise HFImportError(f"{hf_json}: {e}") from None
    return {"tokenizer_adds": {"before": before, "after": after}} if before or after else {}


def chat_template_of(src: Path) -> str | None:
    """The model's chat template: chat_template.jinja, else tokenizer_config.json's."""
    jinja = src / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = _read_json(src / "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _tokenizer_for(src: Path, tokenizer_file: str | None, name: str) -> Tokenizer:
    if tokenizer_file is not None:
        try:
            return Tokenizer.from_file(tokenizer_file)
        except TokenizerError as e:
            raise HFImportError(f"--tokenizer {tokenizer_file}: {e}") from None
    hf_json = src / "tokenizer.json"
    if not hf_json.is_file():
        raise HFImportError(
            f"{src} has no tokenizer.json; pass --tokenizer FILE (an Atlas or "
            "Hugging Face byte-level BPE tokenizer file)"
        )
    try:
        return tokenizer_from_hf_json(hf_json, name=name)
    except TokenizerError as e:
        where = "" if str(hf_json) in str(e) else f"{hf_json}: "  # name the file once
        raise HFImportError(
            f"{where}{e}; pass --tokenizer FILE (an Atlas or Hugging Face byte-level BPE "
            "tokenizer file) to import the weights with another tokenizer"
        ) from None
