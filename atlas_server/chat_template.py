"""One chat template renderer, shared by the server and the trainer.

What it does: turns OpenAI-style messages (`{"role", "content"}`) into token ids the same
way everywhere. `ChatTemplate.prompt_ids(messages)` is what `/v1/chat/completions` feeds
the model (the conversation, then the generation prompt); `ChatTemplate.training_example(
messages)` is what supervised fine-tuning trains on (the ids, and a mask of the tokens the
assistant wrote). For any conversation the two give the same ids, and the prompt of turn k
is exactly the start of the ids of the conversation through turn k: what a model is
trained on is what it is served.

The template is ChatML by default (`<|im_start|>role\\ncontent<|im_end|>\\n` per message,
then `<|im_start|>assistant\\n`), or the Hugging Face Jinja template a checkpoint carries
in `chat_template.jinja` (the file newer `transformers` versions save). Templates run in
Jinja's immutable sandbox with the options and helpers `transformers` gives them
(`trim_blocks`, `lstrip_blocks`, loop controls, `raise_exception`, `strftime_now`, a
`tojson` that does not escape HTML, `{% generation %}` blocks), so the text equals
`tokenizer.apply_chat_template(messages, tokenize=False)`; a template that does not
compile, or cannot render a plain user/assistant exchange, is refused when it is loaded.

From text to ids: the special-token strings the template writes become special ids; the
same strings typed inside a message stay plain text, so a user cannot inject control
tokens. The text is cut at each special token and at the start and end of each assistant
turn, and the pieces are encoded separately: that is what makes the prompt of turn k a
token prefix of the whole conversation. The assistant mask covers each assistant turn's
content and the end-of-turn token that stops generation (what the model produces when
served), not the role header the prompt supplies.

What it does not do: tool calls, images or `continue_final_message`; the sampling stop
ids are given as `stop_token_ids`, but stopping is the engine's job.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from .tokenizer import ENDOFTEXT, IM_END, IM_START, Tokenizer

TEMPLATE_FILE = "chat_template.jinja"
# HF's tokenizer settings: where a Hugging Face checkpoint names its bos/eos strings.
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

CHATML = (
    "{% for message in messages %}"
    f"{IM_START}{{{{ message['role'] }}}}\n{{{{ message['content'] }}}}{IM_END}\n"
    "{% endfor %}"
    f"{{% if add_generation_prompt %}}{IM_START}assistant\n{{% endif %}}"
)

# A conversation every usable template renders; it also reveals the end-of-turn token.
_PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


class ChatTemplateError(ValueError):
    """A template that cannot be used, or messages it cannot render; `param` names the field."""

    def __init__(self, message: str, param: str | None = "messages", detail: str = "") -> None:
        super().__init__(message)
        self.param = param
        self.detail = detail or message  # the template's own words, without our preamble


class NoChatTemplateError(ChatTemplateError):
    """The checkpoint has no template and its tokenizer lacks ChatML's tokens."""


@dataclass(frozen=True)
class TrainingExample:
    """A rendered conversation for supervised fine-tuning."""

    ids: list[int]
    # True where the assistant wrote the token (content and end-of-turn token): the
    # positions a trainer takes the loss on. Same length as `ids`.
    assistant_mask: list[bool]


def _sandbox():
    """A Jinja environment configured as `transformers` configures it for chat templates."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """`{% generation %}...{% endgeneration %}`: marks assistant text for HF's mask.

        Atlas finds assistant tokens from prefix renders instead, so the block just renders
        its body; accepting it lets templates written for TRL's assistant-only loss load.
        """

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes <, > and & for HTML; chat templates want plain JSON.
        return json.dumps(
            value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
            sort_keys=sort_keys,
        )  # fmt: skip

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    class Namespace(jinja2.utils.Namespace):
        """`namespace()` that refuses underscore names (no reaching into CPython internals)."""

        def __setitem__(self, name, value):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"a chat template may not set {name!r} on a namespace"
                )
            super().__setitem__(name, value)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals.update(
        raise_exception=raise_exception, strftime_now=strftime_now, namespace=Namespace
    )
    return env


def message_text(content: Any, index: int) -> str:
    """A message's content as text: a string, None (""), or OpenAI text content parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        parts = []
        where = f"messages[{index}].content"
        for i, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") != "text":
                raise ChatTemplateError("only text content parts are supported", param=where)
            if not isinstance(part.get("text"), str):  # a text part, but its text is wrong
                raise ChatTemplateError(
                    f'content part {i} is a text part without "text" as a string', param=where
                )
            parts.append(part["text"])
        return "".join(parts)
    raise ChatTemplateError(
        "content must be a string or a list of text parts", param=f"messages[{index}].content"
    )


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Plain dicts with string content, as a template expects; other string fields kept."""
    out = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, Mapping) else None
        if not isinstance(role, str) or not role:
            raise ChatTemplateError("every message needs a role", param=f"messages[{i}].role")
        plain = {k: v for k, v in message.items() if isinstance(v, str) and k != "content"}
        plain["content"] = message_text(message.get("content"), i)
        out.append(plain)
    return out


class ChatTemplate:
    """A compiled chat template bound to a tokenizer (see the module docstring)."""

    def __init__(
        self,
        source: str,
        tokenizer: Tokenizer,
        variables: Mapping[str, str] | None = None,
        name: str = "chatml",
    ) -> None:
        import jinja2

        self.source, self.tokenizer, self.name = source, tokenizer, name
        self.variables = dict(variables or {})
        try:
            self._template = _sandbox().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"{name}: line {e.lineno}: {e.message}", param=None) from None
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"{name}: {e}", param=None) from None
        specials = sorted(tokenizer.special_tokens, key=len, reverse=True)
        self._specials = re.compile("|".join(map(re.escape, specials))) if specials else None
        try:
            self.stop_token_ids = self._find_stop_ids()
        except ChatTemplateError as e:
            raise ChatTemplateError(
                f"{name} cannot render a plain user/assistant exchange: {e.detail}", param=None
            ) from None

    @classmethod
    def chatml(cls, tokenizer: Tokenizer) -> ChatTemplate:
        missing = [t for t in (IM_START, IM_END) if t not in tokenizer.special_tokens]
        if missing:
            raise NoChatTemplateError(
                f"this model's tokenizer has no chat tokens {missing} and its checkpoint no "
                f"{TEMPLATE_FILE}; use /v1/completions"
            )
        return cls(CHATML, tokenizer, _default_variables(tokenizer), name="chatml")

    # --- the public renderings ----------------------------------------------------------
    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool,
        continue_final_message: bool = False,
    ) -> str:
        """The template's text for these messages (what `apply_chat_template` returns);
        `continue_final_message`: cut after the last message's content, left open."""
        plain = normalize_messages(messages)
        text = self._render(plain, add_generation_prompt)
        return _open_final(plain, text) if continue_final_message else text

    def prompt_ids(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> list[int]:
        """The ids to serve: the conversation, then (by default) the generation prompt; or,
        with `continue_final_message`, the conversation up to the end of the last message's
        content, for the model to continue that message (a prefilled answer)."""
        ids, _ = self._encode(
            normalize_messages(messages), add_generation_prompt, strict=False,
            continue_final_message=continue_final_message,
        )  # fmt: skip
        return ids

    def training_example(self, messages: Sequence[Mapping[str, Any]]) -> TrainingExample:
        """The conversation's ids and its assistant-token mask, for fine-tuning.

        Raises ChatTemplateError when the template renders an earlier turn differently once
        later ones follow (some templates drop old reasoning): the ids trained on would
        then not be the ids served.
        """
        ids, mask = self._encode(normalize_messages(messages), False, strict=True)
        return TrainingExample(ids, mask)

    # --- internals ----------------------------------------------------------------------
    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        try:
            return self._template.render(
                **self.variables,
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                tools=None,
                documents=None,
            )
        except Exception as e:  # template code is data: any failure is the template's message
            detail = f"{type(e).__name__}: {e}"
            raise ChatTemplateError(
                f"the chat template ({self.name}) cannot render these messages: {detail}",
                detail=detail,
            ) from None

    def _encode(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        strict: bool,
        continue_final_message: bool = False,
    ) -> tuple[list[int], list[bool]]:
        text = self._render(messages, add_generation_prompt)
        if continue_final_message:
            text = _open_final(messages, text)
        turns = self._assistant_turns(messages, text, strict)
        cuts = {0, len(text)}
        for start, end in turns:
            cuts.update((start, end))
        protected = self._content_spans(messages, text)
        pieces = self._pieces(text, cuts, protected)
        ids: list[int] = []
        mask: list[bool] = []
        turn_ends = [self._learned_end(text, start, end, protected) for start, end in turns]
        for start, end, special in pieces:
            piece_ids = [special] if special is not None else self.tokenizer.encode(text[start:end])
            learned = any(s <= start < e for (s, _), e in zip(turns, turn_ends, strict=True))
            ids += piece_ids
            mask += [learned] * len(piece_ids)
        return ids, mask

    def _assistant_turns(
        self, messages: list[dict[str, Any]], text: str, strict: bool
    ) -> list[tuple[int, int]]:
        """[start, end) of each assistant turn in `text`: after the generation prompt that
        precedes it, up to the end of the conversation rendered through it."""
        turns = []
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            try:
                prompt = self._render(messages[:k], True)
                through = self._render(messages[: k + 1], False)
            except ChatTemplateError:
                if strict:
                    raise
                return []
            if through.startswith(prompt) and text.startswith(through):
                turns.append((len(prompt), len(through)))
            elif strict:
                raise ChatTemplateError(
                    f"the chat template ({self.name}) renders messages[{k}] differently once "
                    "later messages follow (or its generation prompt is not how it starts an "
                    "assistant turn), so the ids trained on would not be the ids served"
                )
            else:
                return []
        return turns

    def _learned_end(
        self, text: str, start: int, end: int, protected: list[tuple[int, int]]
    ) -> int:
        """Where the model's own output ends in an assistant turn: after the first stop
        token, not counting a stop token's text inside the content (`protected`), which is
        encoded as plain text and ends nothing."""
        if self._specials is not None:
            for m in self._specials.finditer(text, start, end):
                if any(s <= m.start() < e for s, e in protected):
                    continue
                if self.tokenizer.special_tokens[m.group()] in self.stop_token_ids:
                    return m.end()
        return end

    def _content_spans(self, messages: list[dict[str, Any]], text: str) -> list[tuple[int, int]]:
        """Where message contents that contain special-token strings sit in `text`."""
        if self._specials is None:
            return []
        spans, cursor = [], 0
        for i, message in enumerate(messages):
            content = message["content"]
            if not self._specials.search(content):
                continue
            for needle in (content, content.strip()):
                at = text.find(needle, cursor)
                if at >= 0:
                    spans.append((at, at + len(needle)))
                    cursor = at + len(needle)
                    break
            else:
                token = self._specials.search(content).group()
                raise ChatTemplateError(
                    f"messages[{i}].content contains the control token {token!r}, and this "
                    "chat template changes the content, so it cannot be kept plain text; "
                    "remove it",
                    param=f"messages[{i}].content",
                )
        return spans

    def _pieces(
        self, text: str, cuts: set[int], protected: list[tuple[int, int]]
    ) -> list[tuple[int, int, int | None]]:
        """(start, end, special id or None) covering `text`, split at cuts and specials."""
        specials: dict[int, tuple[int, int]] = {}
        if self._specials is not None:
            for m in self._specials.finditer(text):
                if not any(s <= m.start() < e for s, e in protected):
                    specials[m.start()] = (m.end(), self.tokenizer.special_tokens[m.group()])
                    cuts.update((m.start(), m.end()))
        bounds = sorted(cuts)
        out = []
        for start, end in zip(bounds, bounds[1:], strict=False):
            special = specials.get(start)
            out.append((start, end, special[1] if special and special[0] == end else None))
        return out

    def _find_stop_ids(self) -> tuple[int, ...]:
        """The special token that ends an assistant turn (found by rendering one), plus
        <|endoftext|> and the template's eos_token when they are special tokens."""
        prompt = self._render(_PROBE[:1], True)
        through = self._render(_PROBE, False)
        stops = []
        if self._specials is not None and through.startswith(prompt):
            reply = through.find(_PROBE[1]["content"], len(prompt))
            m = self._specials.search(through, max(reply, len(prompt)))
            if m is not None:
                stops.append(self.tokenizer.special_tokens[m.group()])
        for name in (ENDOFTEXT, self.variables.get("eos_token")):
            if name in self.tokenizer.special_tokens:
                stops.append(self.tokenizer.special_tokens[name])
        return tuple(dict.fromkeys(stops))


def _open_final(messages: list[dict[str, Any]], text: str) -> str:
    """`text` cut right after the last message's content, as transformers'
    `apply_chat_template(continue_final_message=True)` cuts it (and vLLM, which calls it):
    at the content's last occurrence, less the trailing spaces a template trimmed."""
    content = messages[-1]["content"]
    at = text.rfind(content.strip())
    if not content.strip() or at < 0:
        raise ChatTemplateError(
            "continue_final_message: the chat template does not write the final message's "
            "content as it is (or it is empty), so there is nothing to continue",
            param=f"messages[{len(messages) - 1}].content",
        )
    kept = content.lstrip()
    end = at + len(kept) if text[at : at + len(kept)] == kept else at + len(content.strip())
    return text[:end]


def _default_variables(
    tokenizer: Tokenizer, provenance: Mapping[str, Any] | None = None
) -> dict[str, str]:
    """bos_token and eos_token as `export-hf` names them in tokenizer_config.json: the ids
    `import-hf` recorded in the checkpoint's provenance (an imported Llama 3's
    <|begin_of_text|>), else the tokens' names (<|endoftext|> for both, as GPT-2 has it). A
    template that writes `{{ bos_token }}` thus renders here what transformers renders for
    the export."""
    from .hf_export import special_ids  # hf_export imports the checkpoint module, and it this

    ids = special_ids(tokenizer, dict(provenance or {}))
    variables = {}
    for key, token_id in (("bos_token", ids.bos), ("eos_token", ids.first_eos)):
        if token_id is not None:
            variables[key] = tokenizer.decode([token_id])
    return variables


def _checkpoint_provenance(directory: Path) -> dict[str, Any]:
    """The provenance of the atlas checkpoint in `directory` ({} for any other folder: a
    tokenizer folder, a damaged config that loading the checkpoint reports)."""
    from .checkpoint import CheckpointError, read_metadata  # it imports the model; lazily

    try:
        return read_metadata(directory).get("provenance") or {}
    except (CheckpointError, OSError):
        return {}


def _variables_from(directory: Path, tokenizer: Tokenizer) -> dict[str, str]:
    """bos_token, eos_token, ...: the checkpoint's own (_default_variables), then HF's
    tokenizer_config.json beside the template, if any, over them."""
    path = directory / TOKENIZER_CONFIG_FILE
    variables = _default_variables(tokenizer, _checkpoint_provenance(directory))
    if not path.is_file():
        return variables
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ChatTemplateError(f"{path}: {e}", param=None) from None
    for key in _SPECIAL_TOKEN_NAMES:
        value = data.get(key) if isinstance(data, dict) else None
        if isinstance(value, Mapping):  # AddedToken form: {"content": "<s>", ...}
            value = value.get("content")
        if isinstance(value, str):
            variables[key] = value
    return variables


def load_chat_template(directory: str | Path | None, tokenizer: Tokenizer) -> ChatTemplate:
    """The chat template of a checkpoint directory: its chat_template.jinja, else ChatML.

    Raises ChatTemplateError for a template that cannot be used (the message names the
    file and line), and NoChatTemplateError when there is no template file and the
    tokenizer has no ChatML tokens.
    """
    path = Path(directory) / TEMPLATE_FILE if directory is not None else None
    if path is None or not path.is_file():
        return ChatTemplate.chatml(tokenizer)
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ChatTemplateError(f"{path}: {e}", param=None) from None
    variables = _variables_from(path.parent, tokenizer)
    return ChatTemplate(source, tokenizer, variables, name=str(path))
