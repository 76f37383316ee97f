"""Wire schemas of the OpenAI-compatible API, as msgspec Structs.

What it does: declares the request bodies Atlas accepts (field names and defaults follow
the OpenAI API, with vLLM's extras such as top_k, min_p and repetition_penalty) with each
field's range, which msgspec enforces while decoding (a 400 naming the field) and the
OpenAPI schema shows; `check_ranges()` adds the checks that involve several fields.
Responses are plain dicts built in the route modules: their shape varies with
echo/logprobs/stream.
What it does not do: translate requests into engine parameters (see `generation.py`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from ..engine.types import SEED_MAX, SEED_MIN
from .errors import RequestError


class NullMeansDefault(msgspec.Struct, kw_only=True):
    """An explicit `null` on a field with a default means that default: the OpenAI API and
    vLLM accept `"stream": null` or `"n": null`, and some SDKs and proxies send unset
    fields that way. Such fields are typed `X | None` and reset here after decoding."""

    def __post_init__(self) -> None:
        for name, default in _defaults_of(type(self)):
            if getattr(self, name) is None:
                setattr(self, name, default)


class _Body(NullMeansDefault, kw_only=True, forbid_unknown_fields=False):
    """Unknown fields are ignored, as OpenAI-compatible servers do for client extras."""


_DEFAULTS: dict[type, tuple[tuple[str, Any], ...]] = {}


def _defaults_of(cls: type) -> tuple[tuple[str, Any], ...]:
    """(name, default) of `cls`'s fields whose default is a value other than None."""
    if cls not in _DEFAULTS:
        _DEFAULTS[cls] = tuple(
            (f.name, f.default)
            for f in msgspec.structs.fields(cls)
            if f.default is not None and f.default is not msgspec.NODEFAULT
        )
    return _DEFAULTS[cls]


# Ranges are declared on the fields (msgspec checks them while decoding, and the served
# OpenAPI schema shows them); checks that involve several fields are in check_ranges().
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
Stop = Annotated[str, Meta(min_length=1, max_length=256)]
TokenIdKey = Annotated[str, Meta(pattern=r"^-?[0-9]+$")]
Role = Literal["system", "user", "assistant", "developer", "tool"]
CollectionName = Annotated[str, Meta(min_length=1, max_length=255)]
# RAG metadata filters: field -> the value it must equal, or a list of allowed values
# (what the Qdrant store matches on; a list holds strings or integers, not both).
# Integers are 64-bit, as every store's filter engine holds them.
FilterInt = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]
Filters = dict[str, str | FilterInt | bool | Annotated[list[str | FilterInt], Meta(min_length=1)]]


class StreamOptions(_Body, kw_only=True):
    include_usage: bool | None = False


class RAGOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Atlas addition: retrieval-augmented generation for this request. Unknown fields are
    refused here, unlike in the OpenAI fields around it: a mistyped `filter` would
    otherwise ground the answer in unfiltered sources without a word."""

    collection: CollectionName
    top_k: Annotated[int, Meta(ge=1, le=100)] | None = None
    retriever: str | None = None
    reranker: str | None = None
    filters: Filters | None = None


class _SamplingFields(_Body, kw_only=True):
    model: str | None = None
    max_tokens: Annotated[int, Meta(ge=0, le=1_000_000)] | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Meta(ge=-1)] | None = None  # -1 or 0: off
    min_p: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    n: Annotated[int, Meta(ge=1, le=16)] | None = 1
    stop: Stop | Annotated[list[Stop], Meta(max_length=16)] | None = None
    stop_token_ids: list[int] | None = None
    seed: Annotated[int, Meta(ge=SEED_MIN, le=SEED_MAX)] | None = None
    presence_penalty: Penalty | None = 0.0
    frequency_penalty: Penalty | None = 0.0
    repetition_penalty: Annotated[float, Meta(ge=0.01, le=10.0)] | None = 1.0  # engine's minimum
    logit_bias: dict[TokenIdKey, Annotated[float, Meta(ge=-100.0, le=100.0)]] | None = None
    min_tokens: Annotated[int, Meta(ge=0)] | None = 0
    ignore_eos: bool | None = False
    skip_special_tokens: bool | None = True
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    rag: RAGOptions | None = None
    include_stop_str_in_output: bool | None = False  # vLLM's
    # vLLM's: keep only the prompt's last k tokens (left truncation), e.g. to stay within
    # the context without counting tokens on the client.
    truncate_prompt_tokens: Annotated[int, Meta(ge=1)] | None = None
    # vLLM's prompt log-probabilities, refused (below): echo with logprobs gives them in
    # OpenAI's form, which is the one this server speaks.
    prompt_logprobs: Any | None = None
    # vLLM's structured-output fields, declared so that they are refused rather than
    # ignored: a client that asks for one of two choices and gets free text breaks later.
    guided_json: Any | None = None
    guided_regex: Any | None = None
    guided_choice: Any | None = None
    guided_grammar: Any | None = None
    structured_outputs: Any | None = None
    response_format: dict[str, Any] | None = None  # OpenAI's JSON mode (vLLM: both routes)

    def check_shared(self) -> None:
        """The checks across fields that completions and chat share."""
        if self.rag is not None and self.truncate_prompt_tokens is not None:
            # The cut keeps the grounded prompt's tail: the sources (and the question)
            # went, while the answer still listed them as given.
            raise RequestError(
                "truncate_prompt_tokens cannot be combined with rag: cutting the grounded "
                "prompt would drop the sources it lists; a grounded prompt is fitted to the "
                "context already (the lowest-ranked sources are left out)",
                param="truncate_prompt_tokens",
            )
        kind = (self.response_format or {}).get("type") or "text"
        if kind != "text":
            # Named when short; a hostile value is not echoed back whole.
            name = repr(kind) if isinstance(kind, str) and len(kind) <= 40 else "of that type"
            raise RequestError(
                f"response_format {name} is not supported: this server has no constrained "
                'decoding, so it cannot promise JSON; leave it out or send {"type": "text"}',
                param="response_format",
            )
        if self.stream_options is not None and not self.stream:
            raise RequestError(  # OpenAI's and vLLM's rule
                "stream_options is only allowed when stream is true", param="stream_options"
            )
        if self.prompt_logprobs is not None:
            raise RequestError(
                "prompt_logprobs (vLLM's form) is not supported: send echo: true with "
                "logprobs: N to /v1/completions for the prompt's log-probabilities",
                param="prompt_logprobs",
            )
        for name in _STRUCTURED:
            if getattr(self, name) is not None:
                raise RequestError(
                    f"{name} is not supported: this server has no constrained decoding, so "
                    "it cannot promise output of that form; leave it out",
                    param=name,
                )


_STRUCTURED = (
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "structured_outputs",
)


class CompletionRequest(_SamplingFields, kw_only=True):
    # str | list[str] | list[int] | list[list[int]]: msgspec allows one array type in a
    # union, so the list forms are checked in `prompts_of()`.
    prompt: Annotated[str, Meta(min_length=1)] | Annotated[list[Any], Meta(min_length=1)]
    echo: bool | None = False
    logprobs: Annotated[int, Meta(ge=0, le=5)] | None = None
    best_of: int | None = None
    suffix: str | None = None
    # vLLM's extension: put the tokens the model's source tokenizer adds around each text
    # (an imported Llama 3's <|begin_of_text|>) around a text prompt. Token-id prompts are
    # sent as they are.
    add_special_tokens: bool | None = True

    def check_ranges(self) -> None:
        self.check_shared()
        if self.best_of is not None and self.best_of != self.n:
            raise RequestError("best_of is supported only when null or equal to n", param="best_of")
        if self.suffix:
            raise RequestError("suffix is not supported", param="suffix")


class ChatMessage(_Body, kw_only=True):
    role: Role
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingFields, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    max_completion_tokens: Annotated[int, Meta(ge=0, le=1_000_000)] | None = None
    add_generation_prompt: bool | None = True
    # vLLM's and transformers': the last message (a prefilled assistant answer) is left
    # open for the model to continue, instead of closed and followed by a new turn.
    continue_final_message: bool | None = False
    # Declared so that they are refused rather than ignored: a client that asks for tool
    # calls or JSON output and silently gets free text breaks later and further away.
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None  # OpenAI's deprecated form of tools
    function_call: str | dict[str, Any] | None = None  # ... and of tool_choice

    def check_ranges(self) -> None:
        self.check_shared()
        check_continuation(self)
        if self.top_logprobs and not self.logprobs:
            raise RequestError("top_logprobs needs logprobs: true", param="top_logprobs")
        # As vLLM without a tool-call parser: any tool_choice but "none" needs tool calls
        # parsed out of the text. With "none" the tools are left out of the prompt.
        if self.tools and self.tool_choice != "none":
            raise RequestError(
                "tool calls are not supported: this server does not parse tool calls out of "
                'generated text; leave tools out or send tool_choice: "none"',
                param="tools",
            )
        if self.functions and self.function_call != "none":
            raise RequestError(
                "function calls are not supported: this server does not parse them out of "
                'generated text; leave functions out or send function_call: "none"',
                param="functions",
            )
        if not self.tools and self.tool_choice not in (None, "none", "auto"):
            raise RequestError(  # "required" or a named function, with nothing to call
                f"tool_choice {self.tool_choice!r} needs tools, and none were given",
                param="tool_choice",
            )


class TokenizeRequest(_Body, kw_only=True):
    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Meta(min_length=1)] | None = None
    # As vLLM: null means true for a prompt (what /v1/completions sends) and false for
    # messages, whose chat template writes the model's BOS itself.
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False


def check_continuation(req: ChatCompletionRequest | TokenizeRequest) -> None:
    """continue_final_message needs add_generation_prompt false (vLLM's rule): the model
    cannot both continue the last message and start a new one."""
    if req.continue_final_message and req.add_generation_prompt:
        raise RequestError(
            "continue_final_message and add_generation_prompt cannot both be true: send "
            '"add_generation_prompt": false to continue the last message',
            param="continue_final_message",
        )


class DetokenizeRequest(_Body, kw_only=True):
    model: str | None = None
    tokens: list[int]


# The bodies of the API's routes, for the OpenAPI fix-up in openapi_bounds.py (their nested
# Structs come with them).
REQUEST_BODIES = (CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest)
