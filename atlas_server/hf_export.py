"""Export an atlas checkpoint as a Hugging Face model folder.

What it does: writes OUT/ with `config.json` and `generation_config.json` (the HF
architecture that computes exactly what the Atlas model does, `hf_arch.py`),
`model.safetensors` (HF names and layouts; a tied head is left to `transformers` to tie),
`tokenizer.json` in the `tokenizers` format, `tokenizer_config.json` (special tokens and
the chat template: the checkpoint's `chat_template.jinja`, or the ChatML template Atlas
serves by default) and a short README model card. `transformers.AutoModelForCausalLM` and
`AutoTokenizer` load the folder; `tests/test_hf_export.py` checks logits and ids against
Atlas. The folder is written beside OUT and renamed into place, so a failed export leaves
nothing half-written; an existing non-empty OUT is refused unless `overwrite=True`.
`to_transformers` builds the same model in memory (for benchmarks and tests).
What it does not do: quantize (see `gguf_export.py`), push to the hub, or import
`transformers` unless `to_transformers` is called.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .checkpoint import DTYPES, Checkpoint, load_checkpoint
from .hf_arch import (
    Architecture,
    HFConversionError,
    architecture_for,
    hf_config_from_atlas,
    hf_state_from_atlas,
)
from .io import atomic_directory
from .model import Transformer
from .tokenizer import ENDOFTEXT, IM_END, Tokenizer
from .tokenizer.hf_format import tokenizer_config_json, tokenizer_to_hf_json

__all__ = ["SpecialIds", "export_hf", "hf_config_and_state", "special_ids", "to_transformers"]


# Spellings of end- and start-of-text tokens, for tokenizers with no recorded ids
# (an Atlas-trained one with `--special-token "<|eos|>"`); GPT-2's <|endoftext|> is both.
EOS_NAMES = (ENDOFTEXT, "<|end_of_text|>", "<|eos|>", "</s>", "<eos>")
BOS_NAMES = ("<|begin_of_text|>", "<|bos|>", "<s>", "<bos>")


@dataclass(frozen=True)
class SpecialIds:
    """The special ids an export writes: config.json's bos/eos, the ids that end a
    generation, and what the tokenizer adds around each text (an imported Llama 3 BOS)."""

    bos: int | None
    eos: int | list[int] | None  # as config.json holds it (Llama 3 Instruct lists several)
    stops: list[int]
    before: list[int] = field(default_factory=list)
    after: list[int] = field(default_factory=list)
    named_eos: int | None = None  # the source tokenizer's own eos_token, when recorded

    @property
    def first_eos(self) -> int | None:
        """The one eos id a single-id field takes: the tokenizer's own, else the first."""
        if self.named_eos is not None:
            return self.named_eos
        return self.eos[0] if isinstance(self.eos, list) else self.eos


def special_ids(tokenizer: Tokenizer, provenance: dict[str, Any] | None = None) -> SpecialIds:
    """bos/eos from what `import-hf` recorded (the source's config), else by the tokens'
    names; stops are the eos ids and <|im_end|> for chat."""
    provenance = provenance or {}
    known = tokenizer.id_to_special.keys() | tokenizer.id_to_added.keys()

    def recorded(key: str) -> int | list[int] | None:
        value = provenance.get(key)
        ids = value if isinstance(value, list) else [value]
        if value is None or value == [] or not all(type(i) is int and i in known for i in ids):
            return None
        return value

    def named(names: tuple[str, ...]) -> int | None:
        return next(
            (tokenizer.special_tokens[n] for n in names if n in tokenizer.special_tokens), None
        )

    eos = recorded("eos_token_id")
    if eos is None:
        eos = named(EOS_NAMES)
    bos = recorded("bos_token_id")
    if bos is None:
        bos = named(BOS_NAMES)
    if bos is None:
        bos = eos[0] if isinstance(eos, list) else eos
    stops = list(eos) if isinstance(eos, list) else [] if eos is None else [eos]
    if IM_END in tokenizer.special_tokens and tokenizer.special_tokens[IM_END] not in stops:
        stops.append(tokenizer.special_tokens[IM_END])
    adds = provenance.get("tokenizer_adds")
    adds = adds if isinstance(adds, dict) else {}

    def added(side: str) -> list[int]:
        # The server puts these around every text prompt: a damaged record (not special
        # ids of this tokenizer) is ignored, as a recorded eos that is not one is.
        ids = adds.get(side)
        ok = isinstance(ids, list) and all(type(i) is int and i in known for i in ids)
        return list(ids) if ok else []

    own_eos = recorded("tokenizer_eos_token_id")
    return SpecialIds(
        bos,
        eos,
        stops,
        added("before"),
        added("after"),
        own_eos if isinstance(own_eos, int) else None,
    )


def hf_config_and_state(
    model: Transformer,
    tokenizer: Tokenizer | None = None,
    preferred: str | None = None,
    provenance: dict[str, Any] | None = None,
) -> tuple[Architecture, dict[str, Any], dict[str, torch.Tensor]]:
    """The HF architecture, config.json dict and state dict (HF names) of an Atlas model."""
    arch = architecture_for(model.config, preferred)
    ids = special_ids(tokenizer, provenance) if tokenizer is not None else None
    bos, eos = (ids.bos, ids.eos) if ids is not None else (None, None)
    hf_config = hf_config_from_atlas(model.config, arch, bos, eos)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return arch, hf_config, hf_state_from_atlas(state, model.config, arch)


def to_transformers(model: Transformer, tokenizer: Tokenizer | None = None) -> Any:
    """A `transformers` model (eval mode, fp32) holding the same weights as `model`."""
    import transformers

    _, hf_config, state = hf_config_and_state(model, tokenizer)
    config = transformers.AutoConfig.for_model(**hf_config)
    hf = transformers.AutoModelForCausalLM.from_config(config).float()
    missing, unexpected = hf.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if model.config.tie_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"weight names do not line up: missing {missing}, extra {unexpected}")
    if model.config.tie_embeddings:
        hf.tie_weights()
    return hf.eval()


def _model_card(ckpt: Checkpoint, arch: Architecture) -> str:
    provenance = "\n".join(f"- {k}: {v}" for k, v in ckpt.provenance.items())
    c = ckpt.config
    return (
        "---\nlibrary_name: transformers\npipeline_tag: text-generation\n---\n\n"
        f"# {ckpt.path.name}\n\n"
        f"Exported from an Atlas checkpoint (`atlas checkpoint export-hf`) as "
        f"`{arch.hf_class}`: {ckpt.model.num_parameters():,} parameters, {c.n_layers} layers, "
        f"d_model {c.d_model}, {c.n_heads} heads, context {c.max_seq_len}, "
        f"vocabulary {c.vocab_size}.\n\n"
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        'model = AutoModelForCausalLM.from_pretrained("PATH")\n'
        'tokenizer = AutoTokenizer.from_pretrained("PATH")\n```\n\n'
        f"## Provenance of the Atlas checkpoint\n\n{provenance}\n"
    )


def export_hf(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    dtype: str = "float32",
    overwrite: bool = False,
) -> Path:
    """Write the Hugging Face folder OUT for the atlas checkpoint CHECKPOINT."""
    out = Path(out)
    if dtype not in DTYPES:
        raise HFConversionError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    source = Path(checkpoint).resolve()
    if out.resolve() == source or out.resolve() in source.parents:  # OUT is replaced whole
        raise HFConversionError(f"{out} is or holds the checkpoint {checkpoint}; write elsewhere")
    if out.exists() and not out.is_dir():
        raise HFConversionError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise HFConversionError(f"{out} is not empty; pass --overwrite to replace it")
    ckpt = load_checkpoint(checkpoint)
    arch, hf_config, state = hf_config_and_state(
        ckpt.model, ckpt.tokenizer, ckpt.provenance.get("imported_from"), ckpt.provenance
    )
    torch_dtype = DTYPES[dtype]
    # transformers 4 reads "torch_dtype", 5 reads "dtype".
    hf_config["torch_dtype"] = hf_config["dtype"] = str(torch_dtype).removeprefix("torch.")
    ids = special_ids(ckpt.tokenizer, ckpt.provenance)
    generation = {
        "bos_token_id": ids.bos,
        "eos_token_id": ids.stops or None,
        "pad_token_id": ids.first_eos,
    }

    with atomic_directory(out) as tmp:
        tensors = {k: v.to(torch_dtype).contiguous() for k, v in state.items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        files = {
            "config.json": hf_config,
            "generation_config.json": generation,
            "tokenizer.json": tokenizer_to_hf_json(ckpt.tokenizer, ids.before, ids.after),
            "tokenizer_config.json": tokenizer_config_json(
                ckpt.tokenizer,
                ckpt.chat_template,
                ckpt.config.max_seq_len,
                ids.bos,
                ids.first_eos,
                add_bos=ids.before == [ids.bos],
                add_eos=ids.after == [ids.first_eos],
            ),
        }
        for name, content in files.items():
            text = json.dumps(content, indent=2, ensure_ascii=False) + "\n"
            (tmp / name).write_text(text, encoding="utf-8")
        (tmp / "README.md").write_text(_model_card(ckpt, arch), encoding="utf-8")
    return out
