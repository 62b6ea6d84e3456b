"""`python -m reward.serve --model DIR`: the in-process judge as an OpenAI-compatible endpoint.

It lets several trainer processes share one judge without vLLM, and lets the tests run the API
client against a real server. The subset served is what a judge needs:

- POST /v1/chat/completions with text and image_url parts (base64 data URLs only: the server
  fetches nothing), `max_tokens` 1, `logprobs`, `top_logprobs` (capped by --max-logprobs) and
  `logprob_token_ids` (exactly those tokens' log-probabilities, as vLLM returns them); the answer
  token is the most likely one (decoding is greedy whatever the temperature);
- GET /v1/models and GET /health.

Concurrent requests are collected for up to --batch-wait-ms (at most --max-batch) and answered by
one batched forward. JSON only (never pickle); loopback by default; optional bearer API key.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
import time
import uuid
from concurrent.futures import Future
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch
from torch import Tensor

from .chat_wire import from_openai_messages
from .prompts import Conversation
from .vlm_judge import TransformersJudge


class BadRequest(ValueError):
    """A request the server cannot answer; sent back as HTTP 400 with the message."""


def parse_chat_request(body: Any, max_logprobs: int, vocab_size: int,
                       max_images: int = 6) -> tuple[Conversation, dict[str, Any]]:
    """Validate a chat-completions body; return the conversation and the answer options."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    if body.get("max_tokens", body.get("max_completion_tokens", 1)) != 1:
        raise BadRequest("this judge server answers exactly one token: set max_tokens to 1")
    if body.get("n", 1) != 1 or body.get("stream", False):
        raise BadRequest("n must be 1 and stream false")
    try:
        conversation = from_openai_messages(body.get("messages"), max_images=max_images)
    except ValueError as err:
        raise BadRequest(str(err)) from err
    logprobs = bool(body.get("logprobs", False))
    top = body.get("top_logprobs", 0) or 0
    if not isinstance(top, int) or top < 0 or top > max_logprobs:
        raise BadRequest(f"top_logprobs must be an integer in [0, {max_logprobs}] (raise --max-logprobs), got {top!r}")
    ids = body.get("logprob_token_ids")
    if ids is not None and (not isinstance(ids, list)
                            or not all(isinstance(t, int) and 0 <= t < vocab_size for t in ids)):
        raise BadRequest(f"logprob_token_ids must be a list of token ids in [0, {vocab_size})")
    return conversation, {"logprobs": logprobs, "top_logprobs": top, "logprob_token_ids": ids,
                          "model": body.get("model")}


class Batcher:
    """Collects conversations for up to `wait_s` (at most `max_batch`) and scores them together."""

    def __init__(self, judge: TransformersJudge, max_batch: int, wait_s: float):
        self.judge, self.max_batch, self.wait_s = judge, max_batch, wait_s
        self._queue: queue.Queue[tuple[Conversation, Future] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="judge-batcher", daemon=True)
        self._thread.start()

    def submit(self, conversation: Conversation) -> Future:
        fut: Future = Future()
        self._queue.put((conversation, fut))
        return fut

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            deadline = time.monotonic() + self.wait_s
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                batch.append(nxt)
            try:
                self._answer(batch)
            except Exception as err:
                if len(batch) == 1:
                    batch[0][1].set_exception(err)
                    continue
                for one in batch:  # find which request failed; the others still get answers
                    try:
                        self._answer([one])
                    except Exception as single_err:
                        one[1].set_exception(single_err)

    def _answer(self, batch: list[tuple[Conversation, Future]]) -> None:
        with torch.no_grad():
            rows = self.judge.next_token_log_probs([c for c, _ in batch]).float().cpu()
        for (_, fut), row in zip(batch, rows, strict=True):
            fut.set_result(row)


def _entry(tokenizer: Any, token_id: int, logprob: float) -> dict[str, Any]:
    text = tokenizer.decode([token_id])
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def completion_body(row: Tensor, options: dict[str, Any], tokenizer: Any, model_name: str,
                    prompt_tokens: int = 0) -> dict[str, Any]:
    """The chat-completion JSON for one answer distribution `row` (log-probabilities over the vocabulary)."""
    answer = int(row.argmax())
    first = _entry(tokenizer, answer, float(row[answer]))
    if options["logprob_token_ids"]:  # as vLLM: exactly these tokens; an empty list means top-k
        first["top_logprobs"] = [_entry(tokenizer, t, float(row[t])) for t in options["logprob_token_ids"]]
    else:
        values, ids = row.topk(options["top_logprobs"])
        first["top_logprobs"] = [_entry(tokenizer, int(t), float(v)) for v, t in zip(values, ids, strict=True)]
    choice = {"index": 0, "message": {"role": "assistant", "content": first["token"]}, "finish_reason": "length",
              "logprobs": {"content": [first]} if options["logprobs"] else None}
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model_name, "choices": [choice],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 1, "total_tokens": prompt_tokens + 1}}


class JudgeServer:
    """The HTTP server around a `TransformersJudge`. `start()` serves from a background thread."""

    def __init__(self, judge: TransformersJudge, *, host: str = "127.0.0.1", port: int = 8000,
                 model_name: str = "judge", api_key: str | None = None, max_batch: int = 16,
                 batch_wait_ms: float = 5.0, max_logprobs: int = 20, max_images: int = 6,
                 max_body_mb: float = 64.0):
        if max_batch < 1 or batch_wait_ms < 0 or max_logprobs < 1 or max_images < 1:
            raise ValueError("max_batch, max_logprobs and max_images must be >= 1 and batch_wait_ms >= 0")
        self.max_images = max_images
        self.judge, self.model_name, self.api_key = judge, model_name, api_key
        self.max_logprobs, self.max_body = max_logprobs, int(max_body_mb * 2**20)
        self.batcher = Batcher(judge, max_batch, batch_wait_ms / 1000)
        self.httpd = ThreadingHTTPServer((host, port), _handler_for(self))
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None
        self._serving = False

    @property
    def url(self) -> str:
        """The API root, e.g. http://127.0.0.1:8000/v1."""
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> JudgeServer:
        """Serve from a background thread (returns at once)."""
        self._serving = True
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="judge-http", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Serve in this thread until `close()` (from another thread) or KeyboardInterrupt."""
        self._serving = True
        self.httpd.serve_forever(poll_interval=poll_interval)

    def close(self) -> None:
        """Stop serving, free the port and stop the batcher."""
        if self._serving:   # shutdown() would wait forever for a loop that never ran
            self.httpd.shutdown()
        self.httpd.server_close()
        self.batcher.close()

    def __enter__(self) -> JudgeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _handler_for(server: JudgeServer) -> type[BaseHTTPRequestHandler]:
    tokenizer = server.judge.parts.tokenizer
    vocab_size = int(server.judge.model.get_output_embeddings().weight.shape[0])

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet by default
            pass

        def _send(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str) -> None:
            self._send(status, {"error": {"message": message, "type": HTTPStatus(status).phrase, "code": status}})

        def _authorised(self) -> bool:
            if server.api_key and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                self._error(401, "missing or wrong API key (send Authorization: Bearer KEY)")
                return False
            return True

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path == "/health":
                return self._send(200, {"status": "ok"})
            if not self._authorised():
                return None
            if self.path == "/v1/models":
                return self._send(200, {"object": "list", "data": [
                    {"id": server.model_name, "object": "model", "created": 0, "owned_by": "onejudge"}]})
            return self._error(404, f"no route GET {self.path}")

        def do_POST(self) -> None:  # noqa: N802
            if not self._authorised():
                return None
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                return self._error(400, "Content-Length must be an integer")
            if length > server.max_body:
                self.close_connection = True   # the unread body must not be parsed as the next request
                return self._error(413, f"request body over {server.max_body} bytes")
            raw = self.rfile.read(length)
            if self.path != "/v1/chat/completions":
                return self._error(404, f"no route POST {self.path}")
            try:
                conversation, options = parse_chat_request(json.loads(raw), server.max_logprobs, vocab_size,
                                                           server.max_images)
                if options["model"] not in (None, server.model_name):
                    raise BadRequest(f"model {options['model']!r} is not served here; GET /v1/models lists "
                                     f"{server.model_name!r}")
            except json.JSONDecodeError as err:
                return self._error(400, f"the body is not JSON: {err}")
            except BadRequest as err:
                return self._error(400, str(err))
            try:
                row = server.batcher.submit(conversation).result()
            except ValueError as err:  # e.g. a chat template that cannot place the images
                return self._error(400, str(err))
            except Exception as err:
                return self._error(500, f"{type(err).__name__}: {err}")
            return self._send(200, completion_body(row, options, tokenizer, server.model_name))

    return Handler


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m reward.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="local directory or cached Hub id of the judge VLM")
    p.add_argument("--served-model-name", default=None, help="name clients send as `model` (default: --model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-env", default=None, help="environment variable holding the API key clients must send")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--max-logprobs", type=int, default=20)
    p.add_argument("--max-images", type=int, default=6,
                   help="images per request (pairwise with source, crops and a reference shows 6)")
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--attn-implementation", default="sdpa")
    p.add_argument("--max-pixels", type=int, default=None, help="override the image processor's max_pixels")
    args = p.parse_args(argv)
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            p.error(f"--api-key-env names {args.api_key_env!r}, but that environment variable is empty")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"warning: serving on {args.host} without an API key: anyone who reaches it can use the judge",
              file=sys.stderr)
    judge = TransformersJudge(args.model, dtype=args.dtype, device=args.device, batch_size=args.max_batch,
                              attn_implementation=args.attn_implementation, max_pixels=args.max_pixels)
    server = JudgeServer(judge, host=args.host, port=args.port, model_name=args.served_model_name or args.model,
                         api_key=api_key, max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
                         max_logprobs=args.max_logprobs, max_images=args.max_images)
    print(f"judge {args.model} served at {server.url} (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


if __name__ == "__main__":
    main()
