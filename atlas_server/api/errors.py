"""Errors as OpenAI error bodies: `{"error": {"message", "type", "param", "code"}}`.

What it does: defines `APIError` (and `RequestError` for 400s) and the Litestar exception
handlers that turn every failure — validation, malformed JSON, oversize bodies, unknown
routes, engine refusals, RAG errors, plugin failures and unexpected bugs — into an OpenAI
error body with the right status. The RAG service raises its own errors
(`atlas_server/rag/errors.py`); `rag_error()` maps them here: a bad request is a 400, an
unknown collection a 404 (as OpenAI answers for a model that does not exist, also when a
request body names it), a failing plugin a 502 whose traceback is logged once with the
plugin's name (a vector store's own bug too: `StorePluginError`), an unusable vector
store a 503. Unexpected exceptions become 500 with a generic message; their traceback
goes to the server log, never to the client.
It also declares those bodies for the OpenAPI schema (`error_responses(...)`, used on
every route), so the served schema documents the errors a client can actually get.
What it does not do: decide when a request is invalid (schemas and routes do that).
"""

from __future__ import annotations

import json
import logging
import math
import re
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi.datastructures import ResponseSpec

from ..rag.errors import (
    CollectionNotFound,
    PluginRuntimeError,
    RAGError,
    UnknownComponentError,
    VectorStoreUnavailable,
)

log = logging.getLogger("atlas.api")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


_MEANINGS = {
    400: "The request is malformed or a value is out of range; `param` names the field.",
    401: "Missing or wrong API key (only when the server runs with one).",
    404: "The named model or collection does not exist.",
    413: "The request body is larger than the server accepts.",
    429: "The request queue is full; retry after the `Retry-After` seconds.",
    502: "A retriever, reranker or vector store plugin failed; `message` names it.",
    503: "The model is still loading, the server is shutting down, or the vector store is unavailable.",
}


class ErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(msgspec.Struct):
    """The OpenAI error body: `{"error": {"message", "type", "param", "code"}}`."""

    error: ErrorDetail


def error_responses(*statuses: int) -> dict[int, ResponseSpec]:
    """OpenAPI response entries for these error statuses, all with the OpenAI error body.

    They replace Litestar's default 400 entry, which describes a body Atlas never sends.
    """
    return {
        s: ResponseSpec(ErrorBody, description=_MEANINGS[s], generate_examples=False)
        for s in statuses
    }


class APIError(Exception):
    """An error to send as an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)


class ClientDisconnected(APIError):
    """The client hung up before its answer was ready; the work was cancelled.

    Answered with nginx's 499 ("client closed request") that nobody will read, and logged
    at info level: a client that goes away is routine, not a server error.
    """

    def __init__(self) -> None:
        super().__init__(499, "client closed the connection before the response")


class ServerDraining(APIError):
    """The server received SIGTERM: new work is refused while running requests finish."""

    def __init__(self) -> None:
        super().__init__(
            503,
            "the server is shutting down; retry on another replica",
            headers={"Retry-After": "1"},
        )


class ShutDownBeforeFinishing(APIError):
    """The drain deadline passed while this request was running (see ServerState.drain)."""

    def __init__(self) -> None:
        super().__init__(503, "the server shut down before this request finished; retry it")


class RequestError(APIError):
    """400: the request is malformed or asks for something out of range."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(400, message, param, code)


def rag_error(e: RAGError, prefix: str = "") -> APIError:
    """The APIError of a RAG error; `prefix` is where the RAG fields sit in the request
    ("rag." inside a completion body, "" for /v1/retrieve)."""
    param = prefix + e.param if e.param else (prefix.rstrip(".") or None)
    if isinstance(e, CollectionNotFound):
        return APIError(404, str(e), param=param, code="collection_not_found")
    if isinstance(e, PluginRuntimeError):
        # The client gets the message; the operator needs the plugin's traceback.
        log.error("%s %r of plugin %r failed", e.kind, e.name, e.plugin, exc_info=e)
        return APIError(502, str(e), param=prefix.rstrip(".") or None, code="plugin_error")
    if isinstance(e, VectorStoreUnavailable):
        return APIError(503, str(e), code="store_unavailable", headers={"Retry-After": "5"})
    if isinstance(e, UnknownComponentError):
        return RequestError(str(e), param=param, code="unknown_plugin_component")
    return RequestError(str(e), param=param)


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _response(
    request: Request, status: int, message: str, param=None, code=None, headers=None
) -> Response:
    state = getattr(request.app.state, "atlas", None)
    if state is not None:
        state.metrics.errors.labels(status=str(status)).inc()
    return Response(error_body(status, message, param, code), status_code=status, headers=headers)


def _param_from_validation(detail: str, key: str | None = None) -> str | None:
    """The field a validation message is about. msgspec says e.g. "Expected `int`, got
    `str` - at `$.max_tokens`", for a dict key "... - at `key` in `$.logit_bias`", and for
    a missing field "Object missing required field `text` - at `$.documents[0]`" (no path
    at the top level), an unknown one "Object contains unknown field `filter`"; Litestar may give the object's path as `key` instead. A value inside
    a map (`filters[...]`) is reported as the map."""
    paths = re.findall(r"`\$\.([^`]+)`", detail)
    where = key if key and key != "data" else (paths[-1] if paths else None)
    named = re.search(r"(?:missing required|contains unknown) field `([^`]+)`", detail)
    if named:  # the field inside the object named (a missing one, or a mistyped one)
        where = f"{where}.{named[1]}" if where else named[1]
    return where.replace("[...]", "") if where else None


def handle_api_error(request: Request, exc: APIError) -> Response:
    if isinstance(exc, ClientDisconnected):
        log.info("%s %s: client disconnected; request cancelled", request.method, request.url.path)
    return _response(request, exc.status, exc.message, exc.param, exc.code, exc.headers)


def handle_rag_error(request: Request, exc: RAGError) -> Response:
    return handle_api_error(request, rag_error(exc))


# What Litestar raises (as a 500) when the client hangs up while its body is being read.
_BODY_CUT_SHORT = "client disconnected prematurely"


def handle_http_exception(request: Request, exc: HTTPException) -> Response:
    if exc.status_code >= 500 and _BODY_CUT_SHORT in str(exc.detail):
        # Routine (a flaky client, a load balancer's timeout), not a server error: counted
        # and logged as the other hang-ups are, so no alert on 5xx fires for it.
        return handle_api_error(request, ClientDisconnected())
    status = exc.status_code
    detail = str(exc.detail)
    param = None
    if isinstance(exc, ValidationException):
        extra = exc.extra if isinstance(exc.extra, list) else []
        problems = [e for e in extra if isinstance(e, dict)]
        # Litestar's way of saying the request had no body at all:
        missing = bool(problems) and problems[0].get("message") == "'data'"
        if missing:
            detail = "the request body is missing: send a JSON object"
        elif problems:
            first = problems[0]
            param = _param_from_validation(str(first.get("message", "")), first.get("key"))
            detail = "; ".join(
                f"{p.get('message')}"
                + (f" (field `{p['key']}`)" if p.get("key") not in (None, "data") else "")
                for p in problems
            )
        if not missing and ("decod" in detail.lower() or "json" in detail.lower() and not problems):
            detail = f"the request body is not valid JSON: {exc.detail}"
        status = 400
    if status == 400 and detail.lower().startswith("input data was truncated"):
        # msgspec's words for a body that ends inside a value ('{"prompt": "ab')
        detail = "the request body is not valid JSON: it ends before the JSON does"
    if status == 400 and param is None and ("malformed" in detail or "out of range" in detail):
        field = _non_finite_field(request)
        if field is not None:
            param = field
            detail = (
                f"{field} must be a finite number: JSON has no NaN or Infinity (Python's "
                "json.dumps writes them for float('nan') and float('inf')), and numbers "
                "beyond 1.8e308 do not fit a double"
            )
    if status == 413:
        detail = "the request body is too large"
    elif status == 404:
        detail = f"no route {detail}" if detail.startswith("/") else "not found"
    elif status == 405:
        detail = "method not allowed for this route"
    if status >= 500:
        log.error("HTTP %s: %s", status, detail)
        detail = "internal server error"
    return _response(request, status, detail, param, headers=getattr(exc, "headers", None))


def _non_finite_field(request: Request) -> str | None:
    """The path (`temperature`, `logit_bias.5`) of the body's first NaN, Infinity or number
    too large for a double, or None. msgspec refuses such a body whole, naming no field;
    Python's json reads them, so the body (read already, or this is not reached) is read
    again with it to say which field holds one."""
    body = getattr(request, "_body", None)
    if not isinstance(body, bytes) or len(body) > 1 << 20:
        return None

    def walk(value: Any, path: str) -> str | None:
        if isinstance(value, float) and not math.isfinite(value):
            return path
        if isinstance(value, dict):
            pairs: Any = ((f"{path}.{k}", v) for k, v in value.items())
        elif isinstance(value, list):
            pairs = ((f"{path}[{i}]", v) for i, v in enumerate(value))
        else:
            return None
        for where, item in pairs:
            if (found := walk(item, where)) is not None:
                return found
        return None

    try:
        found = walk(json.loads(body), "")
    except (ValueError, RecursionError):
        return None
    return found.lstrip(".") if found else None


def handle_too_deep(request: Request, exc: RecursionError) -> Response:
    return _response(request, 400, "the request body is nested too deeply")


def handle_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _response(request, 500, "internal server error; the server log has the details")


EXCEPTION_HANDLERS = {
    APIError: handle_api_error,
    RAGError: handle_rag_error,
    HTTPException: handle_http_exception,
    RecursionError: handle_too_deep,
    Exception: handle_unexpected,
}
