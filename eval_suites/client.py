"""An OpenAI-compatible HTTP client for evaluation: cached, bounded, with clear errors.

What it does: sends JSON requests to `/v1/completions`, `/v1/chat/completions`,
`/v1/models` and the vLLM-style `/tokenize` and `/tokenizer_info` of any server that speaks
the OpenAI API (Atlas, vLLM, llama.cpp's server, the transformers shim in bench/), with
  - a response cache (see `cache.py`) so interrupted runs resume and reruns are free;
  - a concurrency bound (an asyncio semaphore) and retries on 429/502/503 (overload) that
    honour Retry-After, up to `max_retries` (5) times; and, as lm-evaluation-harness retries
    a failed API request (3 times), up to `max_error_retries` (3) retries with exponential
    backoff (0.5, 1, 2 s) of any other 5xx answer and of a connection reset or closed
    mid-exchange, so one server hiccup does not end a long run;
  - errors mapped to `errors.py`: unreachable server, 401/403, other 4xx/5xx with the
    server's own message;
  - capability probes: echo + prompt logprobs, /tokenize.
What it does not do: streaming (the latency suite uses `loadgen.py`) or any knowledge of
server internals: everything goes over HTTP.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import Awaitable, Iterable
from typing import Any, TypeVar

import httpx

from atlas_server.progress import progress_bar

from .cache import ResponseCache, request_key
from .errors import (
    AuthenticationError,
    CapabilityError,
    ServerRequestError,
    ServerUnreachableError,
)

__all__ = ["OpenAIClient", "first_choice", "gather_with_progress", "server_root"]

T = TypeVar("T")
RETRY_STATUSES = {429, 502, 503}  # overload: Retry-After honoured, max_retries
# A connection that the server reset or closed mid-exchange: retried like a 5xx (not a
# refused connection: nothing listens there, and the user should know at once).
RESET_ERRORS = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)
ERROR_BACKOFF_S = 0.5  # first wait before retrying a 5xx or a reset; doubled each time


class OpenAIClient:
    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        model: str | None = None,
        cache: ResponseCache | None = None,
        server_id: str | None = None,
        concurrency: int = 4,
        timeout_s: float = 600.0,
        max_retries: int = 5,
        max_error_retries: int = 3,
    ) -> None:
        self.base_url = server_root(base_url)
        self.api_key = api_key
        self.model = model
        self.cache = cache
        self.server_id = server_id or self.base_url
        self.max_retries = max_retries
        self.max_error_retries = max_error_retries
        self._semaphore = asyncio.Semaphore(max(1, concurrency))
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=headers, timeout=httpx.Timeout(timeout_s)
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> OpenAIClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- transport ------------------------------------------------------------------
    async def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One request with retries on overload, on other 5xx answers and on connection
        resets (module docstring); returns the decoded JSON body."""
        overloads = errors = 0
        while True:
            try:
                async with self._semaphore:
                    response = await self._http.request(method, path, json=body)
            except httpx.TimeoutException:
                raise ServerUnreachableError(
                    f"{method} {self.base_url}{path} timed out; the server is too slow or stuck"
                ) from None
            except (httpx.TransportError, httpx.InvalidURL, OSError, OverflowError) as e:
                if isinstance(e, RESET_ERRORS) and errors < self.max_error_retries:
                    await asyncio.sleep(ERROR_BACKOFF_S * 2**errors)
                    errors += 1
                    continue
                # Any failure to connect or exchange (a refused or reset connection, a URL
                # the socket layer rejects) means no server answers there.
                raise ServerUnreachableError(
                    f"cannot reach an OpenAI-compatible server at {self.base_url} ({e.__class__.__name__}:"
                    f" {e or 'connection failed'}){retried(errors)}; is it running, and is the URL right?"
                ) from None
            status = response.status_code
            if status in RETRY_STATUSES and overloads < self.max_retries:
                await asyncio.sleep(_retry_delay(response, overloads))
                overloads += 1
                continue
            if status >= 500 and status not in RETRY_STATUSES and errors < self.max_error_retries:
                await asyncio.sleep(ERROR_BACKOFF_S * 2**errors)
                errors += 1
                continue
            return self._decode(method, path, response, overloads + errors)

    def _decode(self, method: str, path: str, response: httpx.Response, retries: int = 0) -> Any:
        if response.status_code in (401, 403):
            raise AuthenticationError(
                f"{self.base_url} refused the request with HTTP {response.status_code}"
                f" ({_server_message(response)}); pass the right key with --api-key"
            )
        if response.status_code >= 400:
            raise ServerRequestError(
                f"{method} {path} failed with HTTP {response.status_code}"
                f"{retried(retries)}: {_server_message(response)}",
                status=response.status_code,
            )
        try:
            return response.json()
        except ValueError:
            raise ServerRequestError(
                f"{method} {path} answered HTTP {response.status_code} with a body that is not JSON"
            ) from None

    async def cached_post(
        self, path: str, body: dict[str, Any], key_body: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """POST through the response cache (deterministic requests only). `key_body`, when
        given, is what the cache keys on instead of `body`: the same request as far as the
        answer goes, with the parts that differ between runs (a run's own names) made stable."""
        key = request_key(self.server_id, self.model or "", path, key_body or body)
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            return hit
        response = await self.request("POST", path, body)
        if self.cache is not None:
            self.cache.put(key, path, body, response)
        return response

    # --- endpoints ------------------------------------------------------------------
    async def models(self) -> list[dict[str, Any]]:
        body = await self.request("GET", "/v1/models")
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            raise ServerRequestError(f"{self.base_url}/v1/models did not return a model list")
        return data

    async def resolve_model(self) -> dict[str, Any]:
        """Pick the served model (the one named by --model, else the first) and return its card."""
        cards = await self.models()
        if not cards:
            raise ServerRequestError(f"{self.base_url}/v1/models lists no models")
        if self.model is None:
            self.model = str(cards[0].get("id"))
        for card in cards:
            if card.get("id") == self.model:
                return card
        names = ", ".join(str(c.get("id")) for c in cards)
        raise ServerRequestError(
            f"model {self.model!r} is not served at {self.base_url}; it serves: {names}"
        )

    async def completion(
        self, body: dict[str, Any], key_body: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        key = None if key_body is None else {"model": self.model, **key_body}
        return await self.cached_post("/v1/completions", {"model": self.model, **body}, key)

    async def chat(
        self, body: dict[str, Any], key_body: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        key = None if key_body is None else {"model": self.model, **key_body}
        return await self.cached_post("/v1/chat/completions", {"model": self.model, **body}, key)

    async def tokenize(self, text: str, cache: bool = True) -> list[int]:
        """Token ids from the server's vLLM-style /tokenize (no special tokens added)."""
        body = await self.tokenize_request({"prompt": text, "add_special_tokens": False}, cache)
        return body["tokens"]

    async def tokenize_request(self, body: dict[str, Any], cache: bool = True) -> dict[str, Any]:
        """POST /tokenize (through the response cache unless `cache` is false) with `body`
        (a prompt or chat messages); the answer has a list of integer `tokens`. A server
        without the route raises CapabilityError."""
        try:
            request = {"model": self.model, **body}
            answer = await (
                self.cached_post("/tokenize", request)
                if cache
                else self.request("POST", "/tokenize", request)
            )
        except ServerRequestError as e:
            if e.status in (404, 405):
                raise CapabilityError(
                    f"{self.base_url} has no /tokenize endpoint; pass --tokenizer FILE"
                    " (the model's atlas_tokenizer.json or tokenizer.json) so token ids can be computed locally"
                ) from None
            raise
        tokens = answer.get("tokens") if isinstance(answer, dict) else None
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise ServerRequestError(
                f"{self.base_url}/tokenize did not return a list of token ids; pass --tokenizer FILE"
            )
        return answer

    async def tokenizer_info(self) -> dict[str, Any] | None:
        try:
            return await self.request("GET", "/tokenizer_info")
        except ServerRequestError:
            return None

    async def probe_echo_logprobs(self, suite: str, prompt_ids: list[int]) -> None:
        """Fail clearly when the server cannot score a prompt (echo + logprobs)."""
        body = {
            "prompt": [prompt_ids],
            "max_tokens": 1,
            "temperature": 0,
            "echo": True,
            "logprobs": 1,
        }
        what = (
            f"the {suite} suite needs /v1/completions with echo=true and logprobs (prompt"
            f" log-probabilities, as lm-evaluation-harness uses them)"
        )
        try:
            response = await self.request("POST", "/v1/completions", {"model": self.model, **body})
        except ServerRequestError as e:
            raise CapabilityError(f"{what}; {self.base_url} refused the probe: {e}") from None
        try:
            logprobs = response["choices"][0]["logprobs"]["token_logprobs"]
        except (KeyError, IndexError, TypeError):
            logprobs = None
        if not isinstance(logprobs, list) or len(logprobs) < len(prompt_ids):
            raise CapabilityError(
                f"{what}; {self.base_url} answered the probe without prompt logprobs"
            )


def server_root(base_url: str) -> str:
    """The server's root URL: `http://h:8000`, `http://h:8000/` and `http://h:8000/v1/`
    are one server (routes are asked at /v1/... and /tokenize beside it), so they are one
    base URL and one response-cache identity; the scheme and host are lower-cased."""
    url = urllib.parse.urlsplit(base_url.strip())
    path = url.path.rstrip("/").removesuffix("/v1").rstrip("/")
    netloc = url.netloc if "@" in url.netloc else url.netloc.lower()  # keep a password's case
    return urllib.parse.urlunsplit((url.scheme.lower(), netloc, path, url.query, url.fragment))


def retried(times: int) -> str:
    return f" (after {times} {'retry' if times == 1 else 'retries'})" if times else ""


def first_choice(response: Any, path: str) -> dict[str, Any]:
    """choices[0] of an OpenAI response, or a clear error naming what the server sent."""
    choices = response.get("choices") if isinstance(response, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ServerRequestError(
            f"{path} answered without choices[0] (got {str(response)[:120]!r}); is it OpenAI-compatible?"
        )
    return min(choices, key=lambda c: c.get("index", 0) if isinstance(c.get("index"), int) else 0)


def _retry_delay(response: httpx.Response, attempt: int) -> float:
    try:
        return min(30.0, float(response.headers.get("retry-after", "")))
    except ValueError:
        return min(30.0, 0.25 * 2**attempt)


def _server_message(response: httpx.Response) -> str:
    try:
        body = response.json()
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(body, dict) and body.get("detail"):
            return str(body["detail"])
    except ValueError:
        pass
    return " ".join(response.text[:200].split()) or response.reason_phrase  # one line


async def gather_with_progress(
    coroutines: Iterable[Awaitable[T]], desc: str, total: int | None = None
) -> list[T]:
    """Run awaitables concurrently (the client bounds real concurrency); results in order."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    with progress_bar(total=total or len(tasks), desc=desc, unit="req", leave=False) as bar:
        for task in tasks:
            task.add_done_callback(lambda _t: bar.update(1))
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
