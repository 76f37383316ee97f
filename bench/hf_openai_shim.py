"""A small OpenAI-compatible HTTP server over Hugging Face transformers, for side-by-side evals.

What it does: loads an Atlas checkpoint, copies its weights into the equivalent Hugging
Face model (`GPT2LMHeadModel` for GPT-2-shaped checkpoints, `LlamaForCausalLM` for
Llama-shaped ones), and serves it with `transformers`' own `generate()` behind
  GET  /health, /v1/models, /tokenizer_info
  POST /v1/completions  (prompt: string | [string] | [ids] | [[ids]]; max_tokens, temperature,
                         top_p, seed, stop, echo, logprobs, n=1, stream + include_usage)
  POST /v1/chat/completions (ChatML over the tokenizer's special tokens; stream too)
  POST /tokenize, /detokenize (vLLM shapes)
so `atlas-eval run SUITE --base-url http://127.0.0.1:PORT` measures the same weights
through a plain transformers stack, and `atlas-eval compare` puts both side by side.

What it deliberately does not do: batching (requests are served one at a time under a
lock: the baseline is "transformers without a serving engine"), penalties, logit_bias,
n > 1, or stop strings during streaming beyond cutting the text (the stream may show a
token or two of a stop string's start before it is detected). Token strings in logprobs
are the tokens' bytes decoded as UTF-8, or `bytes:\\xNN...` when not valid UTF-8 alone.

Usage:
    python bench/hf_openai_shim.py --checkpoint quickstart/ --port 8100 [--api-key KEY]
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from atlas_server.checkpoint import load_checkpoint  # noqa: E402
from atlas_server.hf_arch import HFConversionError  # noqa: E402
from atlas_server.hf_export import to_transformers  # noqa: E402

LOGPROB_FLOOR = -9999.0  # JSON has no -inf


# --- weights: Atlas -> Hugging Face ---------------------------------------------------------
def load_hf_model(checkpoint: Path):
    """The checkpoint as a `transformers` model, through the export's one name map."""
    ckpt = load_checkpoint(checkpoint)
    try:
        model = to_transformers(ckpt.model, ckpt.tokenizer)
    except HFConversionError as e:
        raise SystemExit(f"error: {checkpoint}: {e}") from None
    return model.eval(), ckpt.tokenizer, ckpt.config


# --- the model service ------------------------------------------------------------------------
class QueueStreamer(BaseStreamer):
    """Hands each generated token id from generate()'s thread to the HTTP thread."""

    def __init__(self, n_prompt: int) -> None:
        self.tokens: queue.Queue[int | None] = queue.Queue()
        self.skip_prompt = n_prompt > 0

    def put(self, value: torch.Tensor) -> None:
        if self.skip_prompt:  # generate() first reports the prompt itself
            self.skip_prompt = False
            return
        for token in value.reshape(-1).tolist():
            self.tokens.put(int(token))

    def end(self) -> None:
        self.tokens.put(None)


class Service:
    def __init__(self, checkpoint: Path, model_name: str) -> None:
        self.model, self.tokenizer, self.config = load_hf_model(checkpoint)
        self.name = model_name
        self.lock = threading.Lock()
        specials = getattr(self.tokenizer, "special_tokens", {}) or {}
        self.eot_id = self.tokenizer.eot_id
        self.im_end_id = specials.get("<|im_end|>")

    def token_text(self, token_id: int) -> str:
        raw = self.tokenizer.token_bytes(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    @torch.inference_mode()
    def prompt_logprobs(
        self, ids: list[int], top: int
    ) -> tuple[list[float | None], list[dict | None]]:
        logits = self.model(torch.tensor([ids])).logits[0].float()  # [T, V]
        logp = torch.log_softmax(logits, dim=-1)
        values: list[float | None] = [None]
        tops: list[dict | None] = [None]
        for t in range(1, len(ids)):
            values.append(max(LOGPROB_FLOOR, float(logp[t - 1, ids[t]])))
            tops.append(self.top_dict(logp[t - 1], top))
        return values, tops

    def top_dict(self, row: torch.Tensor, k: int) -> dict[str, float]:
        if k <= 0:
            return {}
        vals, idx = row.topk(k)
        return {
            self.token_text(int(i)): max(LOGPROB_FLOOR, float(v))
            for v, i in zip(vals, idx, strict=True)
        }

    def generate(
        self, ids: list[int], params: dict[str, Any], streamer: BaseStreamer | None = None
    ):
        """One HF generate() call under the lock; returns generated ids and their raw logits."""
        max_new = int(params.get("max_tokens") if params.get("max_tokens") is not None else 16)
        if len(ids) + max_new > self.config.max_seq_len:
            raise ValueError(
                f"prompt ({len(ids)}) + max_tokens ({max_new}) exceeds {self.config.max_seq_len}"
            )
        if max_new == 0:
            if streamer is not None:
                streamer.end()
            return [], []
        temperature = float(
            params.get("temperature", 1.0) if params.get("temperature") is not None else 1.0
        )
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new,
            "do_sample": temperature > 0,
            "pad_token_id": self.eot_id if self.eot_id is not None else 0,
            "eos_token_id": [t for t in (self.eot_id, self.im_end_id) if t is not None] or None,
            "return_dict_in_generate": True,
            "output_logits": True,
            "streamer": streamer,
        }
        if params.get("ignore_eos"):
            kwargs["eos_token_id"] = None
        if temperature > 0:
            kwargs.update(temperature=temperature, top_p=float(params.get("top_p") or 1.0), top_k=0)
        with self.lock, torch.inference_mode():
            if params.get("seed") is not None:
                torch.manual_seed(int(params["seed"]))
            out = self.model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                **kwargs,
            )
        new_ids = out.sequences[0, len(ids) :].tolist()
        return new_ids, [logit[0].float() for logit in out.logits]


# --- request handling -------------------------------------------------------------------------
class BadRequest(Exception):
    pass


def prompts_of(body: dict[str, Any], service: Service) -> list[list[int]]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [service.tokenizer.encode(prompt, allowed_special="all")]
    if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return [service.tokenizer.encode(p, allowed_special="all") for p in prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
        return [list(map(int, p)) for p in prompt]
    raise BadRequest("prompt must be a string, a list of strings, token ids or lists of token ids")


def cut_at_stop(text: str, stop: Any) -> tuple[str, bool]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    cuts = [text.find(s) for s in stops if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def completion_choice(
    service: Service, ids: list[int], body: dict[str, Any], index: int
) -> tuple[dict, int]:
    new_ids, logits = service.generate(ids, body)
    text = service.tokenizer.decode(new_ids)
    text, stopped = cut_at_stop(text, body.get("stop"))
    hit_eos = bool(new_ids) and new_ids[-1] in (service.eot_id, service.im_end_id)
    finish = "stop" if stopped or hit_eos else "length"
    if hit_eos and not stopped:
        text = service.tokenizer.decode(new_ids[:-1])
    choice: dict[str, Any] = {
        "index": index,
        "text": text,
        "finish_reason": finish,
        "logprobs": None,
    }
    k = body.get("logprobs")
    if k is not None:
        tokens, values, tops = [], [], []
        if body.get("echo"):
            pv, pt = service.prompt_logprobs(ids, int(k))
            tokens, values, tops = [service.token_text(t) for t in ids], pv, pt
        for token, row in zip(new_ids, logits, strict=True):
            logp = torch.log_softmax(row, dim=-1)
            tokens.append(service.token_text(token))
            values.append(max(LOGPROB_FLOOR, float(logp[token])))
            tops.append(service.top_dict(logp, int(k)))
        offsets, pos = [], 0
        for token in tokens:
            offsets.append(pos)
            pos += len(token)
        choice["logprobs"] = {
            "tokens": tokens,
            "token_logprobs": values,
            "top_logprobs": tops,
            "text_offset": offsets,
        }
    if body.get("echo"):
        choice["text"] = service.tokenizer.decode(ids) + choice["text"]
    return choice, len(new_ids)


def chat_prompt(service: Service, messages: Any) -> list[int]:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list")
    parts = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise BadRequest("each message needs string content")
        parts.append(f"<|im_start|>{m.get('role', 'user')}\n{content}<|im_end|>\n")
    parts.append("<|im_start|>assistant\n")
    return service.tokenizer.encode("".join(parts), allowed_special="all")


class Handler(BaseHTTPRequestHandler):
    service: Service
    api_key: str | None = None
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the eval prints progress
        return

    # plumbing
    def send_json(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_error_body(
        self, status: int, message: str, kind: str = "invalid_request_error"
    ) -> None:
        self.send_json(
            status, {"error": {"message": message, "type": kind, "param": None, "code": None}}
        )

    def authorised(self) -> bool:
        if not self.api_key or not self.path.startswith("/v1"):
            return True
        if self.headers.get("Authorization", "") == f"Bearer {self.api_key}":
            return True
        self.send_error_body(401, "invalid or missing API key", "authentication_error")
        return False

    def do_GET(self) -> None:
        if not self.authorised():
            return
        s = self.service
        if self.path == "/health":
            self.send_json(200, {"status": "ok"})
        elif self.path == "/v1/models":
            card = {
                "id": s.name,
                "object": "model",
                "created": 0,
                "owned_by": "hf-shim",
                "max_model_len": s.config.max_seq_len,
            }
            self.send_json(200, {"object": "list", "data": [card]})
        elif self.path == "/tokenizer_info":
            self.send_json(
                200,
                {
                    "tokenizer_class": "AtlasBPE (via hf shim)",
                    "vocab_size": s.tokenizer.vocab_size,
                    "eos_token_id": s.eot_id,
                    "model_max_length": s.config.max_seq_len,
                },
            )
        else:
            self.send_error_body(404, f"no route {self.path}")

    def do_POST(self) -> None:
        if not self.authorised():
            return
        try:
            body = json.loads(
                self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}"
            )
            if not isinstance(body, dict):
                raise BadRequest("the body must be a JSON object")
            route = {
                "/v1/completions": self.completions,
                "/v1/chat/completions": self.chat,
                "/tokenize": self.tokenize,
                "/detokenize": self.detokenize,
            }.get(self.path)
            if route is None:
                self.send_error_body(404, f"no route {self.path}")
                return
            route(body)
        except (BadRequest, ValueError, KeyError, TypeError) as e:
            self.send_error_body(400, str(e))

    def tokenize(self, body: dict) -> None:
        s = self.service
        ids = (
            chat_prompt(s, body["messages"])
            if "messages" in body
            else s.tokenizer.encode(str(body.get("prompt", "")), allowed_special="all")
        )
        self.send_json(
            200, {"count": len(ids), "max_model_len": s.config.max_seq_len, "tokens": ids}
        )

    def detokenize(self, body: dict) -> None:
        self.send_json(200, {"prompt": self.service.tokenizer.decode(body.get("tokens", []))})

    def completions(self, body: dict) -> None:
        if int(body.get("n") or 1) != 1:
            raise BadRequest("the shim serves n=1 only")
        prompts = prompts_of(body, self.service)
        if body.get("stream"):
            self.stream(prompts[0], body, chat=False)
            return
        choices, completion_tokens = [], 0
        for index, ids in enumerate(prompts):
            choice, n = completion_choice(self.service, ids, body, index)
            choices.append(choice)
            completion_tokens += n
        prompt_tokens = sum(len(p) for p in prompts)
        self.send_json(
            200,
            {
                "id": f"cmpl-{uuid.uuid4().hex}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": self.service.name,
                "choices": choices,
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            },
        )

    def chat(self, body: dict) -> None:
        ids = chat_prompt(self.service, body.get("messages"))
        if body.get("stream"):
            self.stream(ids, body, chat=True)
            return
        choice, n = completion_choice(
            self.service, ids, {**body, "logprobs": None, "echo": False}, 0
        )
        self.send_json(
            200,
            {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.service.name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": choice["text"]},
                        "finish_reason": choice["finish_reason"],
                    }
                ],
                "usage": {
                    "prompt_tokens": len(ids),
                    "completion_tokens": n,
                    "total_tokens": len(ids) + n,
                },
            },
        )

    def stream(self, ids: list[int], body: dict, chat: bool) -> None:
        s = self.service
        streamer = QueueStreamer(len(ids))
        worker = threading.Thread(target=s.generate, args=(ids, body, streamer), daemon=True)
        worker.start()
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        kind, rid = ("chat.completion.chunk", "chatcmpl-") if chat else ("text_completion", "cmpl-")
        rid += uuid.uuid4().hex
        generated: list[int] = []
        sent = ""
        finish = "length"
        while (token := streamer.tokens.get()) is not None:
            if token in (s.eot_id, s.im_end_id) and not body.get("ignore_eos"):
                finish = "stop"
                continue
            generated.append(token)
            text = s.tokenizer.decode(generated)
            text, stopped = cut_at_stop(text, body.get("stop"))
            delta = text[len(sent) :]
            sent = text
            if delta:
                self.event(self.chunk(kind, rid, delta, None, chat))
            if stopped:
                finish = "stop"
                break
        worker.join()
        self.event(self.chunk(kind, rid, "", finish, chat))
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {
                "prompt_tokens": len(ids),
                "completion_tokens": len(generated),
                "total_tokens": len(ids) + len(generated),
            }
            self.event(
                {
                    "id": rid,
                    "object": kind,
                    "created": int(time.time()),
                    "model": s.name,
                    "choices": [],
                    "usage": usage,
                }
            )
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()
        self.close_connection = True

    def chunk(self, kind: str, rid: str, text: str, finish: str | None, chat: bool) -> dict:
        choice = {"index": 0, "finish_reason": finish}
        choice.update({"delta": {"content": text}} if chat else {"text": text, "logprobs": None})
        return {
            "id": rid,
            "object": kind,
            "created": int(time.time()),
            "model": self.service.name,
            "choices": [choice],
        }

    def event(self, payload: dict) -> None:
        self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
        self.wfile.flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="example: python bench/hf_openai_shim.py --checkpoint quickstart/ --port 8100",
    )
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument(
        "--model-name", default=None, help="served model id (default: checkpoint dir name)"
    )
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    Handler.service = Service(args.checkpoint, args.model_name or args.checkpoint.resolve().name)
    Handler.api_key = args.api_key
    # The default listen backlog (5) resets connections under a concurrency sweep.
    ThreadingHTTPServer.request_queue_size = 128
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    print(f"hf shim serving {args.checkpoint} on http://{args.host}:{args.port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
