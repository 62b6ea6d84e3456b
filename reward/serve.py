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

Limits, so that no client can exhaust the machine or hang a worker:

- a body needs a Content-Length of at most --max-body-mb (Transfer-Encoding, chunked included,
  is refused with 411; a missing, negative or repeated length with 411/400; too large with 413),
  and such a refusal closes the connection without reading the body as a next request;
- images are capped in decoded pixels, per image (--max-image-pixels) and per request
  (--max-request-pixels), from their headers and before any pixel is decoded (413);
- every socket read or write times out after --socket-timeout seconds; at most
  --max-connections connections are served at once, further ones get 503 with Retry-After at
  once; the listen backlog (--backlog) holds bursts of connections while they are accepted;
- a malformed body (not UTF-8, not JSON, nested too deeply, fields of the wrong type) gets 400
  with the reason; API keys are compared in constant time.

Reproducibility: a request's log-probabilities depend on the other requests of its batch, since
padding to the batch's longest prompt and the batch's shape change the order of floating-point
reductions (left padding itself is masked exactly). So:

- with --max-batch 1 each request is scored alone, and the same request always gets the same
  bits, whatever the concurrency or arrival order (same machine, software, dtype and device);
- with batching (the default), answers are reproducible only up to that rounding. In float32 on
  CPU (the tiny test judge) a batched log-probability differed from the unbatched one by up to
  3e-6 and a score by up to 3e-7; the tests hold them to 2e-5 and 2e-6. Lower precisions
  (bfloat16) and GPU kernels chosen by batch shape widen this in proportion to their rounding.
  On CPU, requests that their batches pad alike (the same batch in another order) match bit for bit.
"""
from __future__ import annotations

import argparse
import hmac
import json
import os
import queue
import re
import socket
import sys
import threading
import time
import uuid
from concurrent.futures import Future
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import Tensor

from reward.judges.vlm_judge import TransformersJudge
from reward.vlm.chat_wire import ImageTooLarge, from_openai_messages
from reward.vlm.prompts import Conversation

#: the default per-image cap when the judge's own max_pixels is smaller (4096 x 4096)
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
#: images of one request may hold this many times the per-image cap together (pairwise shows
#: source, edited and other at full size plus small crops)
REQUEST_PIXELS_PER_IMAGE_CAP = 4
#: vLLM reports log-probabilities below this as this value; JSON has no -Infinity
MIN_LOGPROB = -9999.0
_LINGER_S = 2.0   # how long a refused connection's unread input is discarded before closing
_DIGITS = re.compile(r"[0-9]{1,18}")


class BadRequest(ValueError):
    """A request the server cannot answer; sent back as HTTP 400 with the message."""


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)   # JSON true is not the integer 1 here


def parse_chat_request(body: Any, max_logprobs: int, vocab_size: int, max_images: int = 6,
                       max_image_pixels: int | None = None,
                       max_request_pixels: int | None = None) -> tuple[Conversation, dict[str, Any]]:
    """Validate a chat-completions body; return the conversation and the answer options.

    BadRequest names what is wrong; ImageTooLarge (also a ValueError) when the images are over
    the pixel caps, found from their headers before any pixel is decoded.
    """
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens", 1))
    if not _is_int(max_tokens) or max_tokens != 1:
        raise BadRequest("this judge server answers exactly one token: set max_tokens to 1")
    n = body.get("n", 1)
    if not (n is None or (_is_int(n) and n == 1)) or body.get("stream") not in (None, False):
        raise BadRequest("n must be 1 and stream false")
    logprobs = body.get("logprobs", False)
    if logprobs is not None and not isinstance(logprobs, bool):
        raise BadRequest(f"logprobs must be true or false, got {logprobs!r}")
    top = body.get("top_logprobs", 0) or 0
    if not _is_int(top) or top < 0 or top > max_logprobs:
        raise BadRequest(f"top_logprobs must be an integer in [0, {max_logprobs}] (raise --max-logprobs), got {top!r}")
    ids = body.get("logprob_token_ids")
    if ids is not None and (not isinstance(ids, list)
                            or not all(_is_int(t) and 0 <= t < vocab_size for t in ids)):
        raise BadRequest(f"logprob_token_ids must be a list of token ids in [0, {vocab_size})")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest(f"model must be a string, got {type(model).__name__}")
    try:
        conversation = from_openai_messages(body.get("messages"), max_images=max_images,
                                            max_image_pixels=max_image_pixels, max_request_pixels=max_request_pixels)
    except ImageTooLarge:
        raise
    except ValueError as err:
        raise BadRequest(str(err)) from err
    return conversation, {"logprobs": bool(logprobs), "top_logprobs": top, "logprob_token_ids": ids,
                          "model": model}


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
    return {"token": text, "logprob": max(logprob, MIN_LOGPROB), "bytes": list(text.encode("utf-8"))}


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


def bind_listener(host: str, port: int, backlog: int = 128) -> socket.socket:
    """A TCP socket listening on (host, port); OSError (EADDRINUSE, ...) when it cannot be had.

    `python -m reward.serve` binds before it loads the model, so a busy port fails in a second
    rather than after minutes of loading; connections that arrive while it loads wait in the backlog.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=backlog)


def _linger(sock: socket.socket, seconds: float = _LINGER_S) -> None:
    """Half-close, then discard what the client still sends for a moment before the caller closes.

    Closing a socket with unread input makes the kernel answer with a reset, which can destroy the
    error response before the client reads it; the client closes once it has read the response.
    """
    deadline = time.monotonic() + seconds
    try:
        sock.shutdown(socket.SHUT_WR)
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            if not sock.recv(65536):
                return
    except OSError:
        pass


def _busy_response(retry_after_s: int) -> bytes:
    body = json.dumps({"error": {"message": "the judge server is at --max-connections; retry later",
                                 "type": HTTPStatus.SERVICE_UNAVAILABLE.phrase, "code": 503}}).encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: {retry_after_s}\r\nConnection: close\r\n\r\n")
    return head.encode("ascii") + body


class _BoundedHTTPServer(ThreadingHTTPServer):
    """A thread per connection, at most `max_connections` of them; beyond, 503 without a worker.

    The busy answer is written by a short-lived thread of its own (at most `max_connections` of
    those too) so that the accepting thread never waits on a client; past both limits a
    connection is closed at once.
    """

    daemon_threads = True

    def __init__(self, sock: socket.socket, handler: type[BaseHTTPRequestHandler], *, max_connections: int,
                 retry_after_s: int = 1):
        super().__init__(sock.getsockname()[:2], handler, bind_and_activate=False)
        self.socket.close()   # replaced by the socket bound (maybe long) before
        self.socket = sock
        self.server_address = sock.getsockname()
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])
        self._slots = threading.BoundedSemaphore(max_connections)
        self._busy_slots = threading.BoundedSemaphore(max_connections)
        self._busy = _busy_response(retry_after_s)
        self.rejected = 0   # connections answered 503 (for logs and tests)

    def process_request(self, request: Any, client_address: Any) -> None:
        if self._slots.acquire(blocking=False):
            threading.Thread(target=self._serve, args=(request, client_address), daemon=True).start()
        elif self._busy_slots.acquire(blocking=False):
            self.rejected += 1
            threading.Thread(target=self._reject, args=(request,), daemon=True).start()
        else:
            self.rejected += 1
            self.shutdown_request(request)

    def _serve(self, request: Any, client_address: Any) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _reject(self, request: socket.socket) -> None:
        try:
            request.settimeout(1.0)
            request.sendall(self._busy)
            _linger(request, 1.0)
        except OSError:
            pass
        finally:
            self.close_request(request)
            self._busy_slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return   # a client that went away or stalled: nothing to report
        super().handle_error(request, client_address)


class JudgeServer:
    """The HTTP server around a `TransformersJudge`. `start()` serves from a background thread.

    `sock` is a listening socket from `bind_listener` (host, port and backlog are then unused).
    Pixel caps default to max(4096 x 4096, the judge's max_pixels) per image and 4 times that per
    request; see the module docstring for the other limits.
    """

    def __init__(self, judge: TransformersJudge, *, host: str = "127.0.0.1", port: int = 8000,
                 model_name: str = "judge", api_key: str | None = None, max_batch: int = 16,
                 batch_wait_ms: float = 5.0, max_logprobs: int = 20, max_images: int = 6,
                 max_body_mb: float = 64.0, max_image_pixels: int | None = None,
                 max_request_pixels: int | None = None, socket_timeout: float = 30.0,
                 max_connections: int = 64, backlog: int = 128, sock: socket.socket | None = None):
        if max_batch < 1 or batch_wait_ms < 0 or max_logprobs < 1 or max_images < 1:
            raise ValueError("max_batch, max_logprobs and max_images must be >= 1 and batch_wait_ms >= 0")
        if not max_body_mb > 0 or not socket_timeout > 0 or max_connections < 1 or backlog < 1:
            raise ValueError("max_body_mb and socket_timeout must be > 0, max_connections and backlog >= 1")
        if max_image_pixels is None:
            max_image_pixels = max(DEFAULT_MAX_IMAGE_PIXELS, int(getattr(getattr(judge, "spec", None),
                                                                         "max_pixels", 0) or 0))
        if max_request_pixels is None:
            max_request_pixels = REQUEST_PIXELS_PER_IMAGE_CAP * max_image_pixels
        if max_image_pixels < 1 or max_request_pixels < 1:
            raise ValueError("max_image_pixels and max_request_pixels must be >= 1")
        self.max_images = max_images
        self.max_image_pixels, self.max_request_pixels = max_image_pixels, max_request_pixels
        self.judge, self.model_name, self.api_key = judge, model_name, api_key
        self.max_logprobs, self.max_body = max_logprobs, int(max_body_mb * 2**20)
        self.socket_timeout = float(socket_timeout)
        handler = _handler_for(self)
        if sock is None:
            sock = bind_listener(host, port, backlog)
        self.httpd = _BoundedHTTPServer(sock, handler, max_connections=max_connections)
        self.httpd.request_queue_size = backlog
        self.batcher = Batcher(judge, max_batch, batch_wait_ms / 1000)
        self._thread: threading.Thread | None = None
        self._serving = False

    @property
    def url(self) -> str:
        """The API root, e.g. http://127.0.0.1:8000/v1."""
        host, port = self.httpd.server_address[:2]
        return f"http://[{host}]:{port}/v1" if ":" in str(host) else f"http://{host}:{port}/v1"

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
    expected_auth = f"Bearer {server.api_key}".encode() if server.api_key else None

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = server.socket_timeout   # every read and write of the connection (StreamRequestHandler)
        _unread_input = False             # refused before the body was read: linger, then close

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet by default
            pass

        def _send(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body, allow_nan=False).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str, *, close: bool = False) -> None:
            if close:   # what follows on the connection is not a request we could find the start of
                self.close_connection = True
                self._unread_input = True
            self._send(status, {"error": {"message": message, "type": HTTPStatus(status).phrase, "code": status}})

        def finish(self) -> None:
            super().finish()
            if self._unread_input:
                _linger(self.connection)

        def _authorised(self) -> bool:
            got = self.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            if expected_auth is not None and not hmac.compare_digest(got, expected_auth):
                self._error(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                            close=self.command == "POST")
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

        def _body_length(self) -> int | None:
            """The declared body length, or None after refusing the request (connection closed)."""
            if self.headers.get("Transfer-Encoding") is not None:
                self._error(411, "Transfer-Encoding (chunked or any other) is not supported: send the body "
                            "with a Content-Length", close=True)
                return None
            values = [v.strip() for v in self.headers.get_all("Content-Length") or []]
            if not values:
                self._error(411, "a POST needs a Content-Length header", close=True)
                return None
            if len(set(values)) != 1 or not _DIGITS.fullmatch(values[0]):
                self._error(400, f"Content-Length must be one non-negative integer, got {', '.join(values)!r}",
                            close=True)
                return None
            length = int(values[0])
            if length > server.max_body:
                self._error(413, f"request body over {server.max_body} bytes", close=True)
                return None
            return length

        def do_POST(self) -> None:  # noqa: N802
            length = self._body_length()
            if length is None or not self._authorised():
                return None
            if self.path != "/v1/chat/completions":
                return self._error(404, f"no route POST {self.path}", close=True)
            try:
                raw = self.rfile.read(length)
            except TimeoutError:
                return self._error(408, f"the body did not arrive within --socket-timeout "
                                   f"{server.socket_timeout:g} s", close=True)
            if len(raw) < length:   # the client closed its side early
                self.close_connection = True
                return None
            try:
                body = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                return self._error(400, f"the body is not UTF-8 JSON: {err}")
            except RecursionError:
                return self._error(400, "the body is JSON nested too deeply")
            try:
                conversation, options = parse_chat_request(body, server.max_logprobs, vocab_size, server.max_images,
                                                           server.max_image_pixels, server.max_request_pixels)
                if options["model"] not in (None, server.model_name):
                    raise BadRequest(f"model {options['model']!r} is not served here; GET /v1/models lists "
                                     f"{server.model_name!r}")
            except ImageTooLarge as err:
                return self._error(413, str(err))
            except BadRequest as err:
                return self._error(400, str(err))
            except (ValueError, TypeError, KeyError, AttributeError, IndexError, RecursionError) as err:
                return self._error(400, f"malformed request ({type(err).__name__}): {err}")
            try:
                row = server.batcher.submit(conversation).result()
            except ValueError as err:  # e.g. a chat template that cannot place the images
                return self._error(400, str(err))
            except Exception as err:
                return self._error(500, f"{type(err).__name__}: {err}")
            if bool(torch.isnan(row).any()):   # never hand a client a distribution it would turn into a reward
                return self._error(500, "the judge produced NaN log-probabilities for this request")
            return self._send(200, completion_body(row, options, tokenizer, server.model_name))

    return Handler


def _model_dir_missing(name: str) -> bool:
    """True when `name` can only be a local directory and none is there (Hub ids are org/name)."""
    looks_like_path = (Path(name).is_absolute() or name.startswith(".") or name.count("/") > 1
                       or (os.sep != "/" and os.sep in name))
    return looks_like_path and not Path(name).is_dir()


def _fail(message: str) -> NoReturn:
    """One line on stderr and exit status 2 (as argparse does for bad arguments), no traceback."""
    print(f"python -m reward.serve: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


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
    p.add_argument("--max-body-mb", type=float, default=64.0, help="largest request body, in MiB")
    p.add_argument("--max-image-pixels", type=int, default=None,
                   help="decoded pixels per image (default: max(4096*4096, the judge's max_pixels))")
    p.add_argument("--max-request-pixels", type=int, default=None,
                   help="decoded pixels of all images of one request (default: 4 x --max-image-pixels)")
    p.add_argument("--socket-timeout", type=float, default=30.0,
                   help="seconds any read or write of a connection may stall before it is closed")
    p.add_argument("--max-connections", type=int, default=64,
                   help="connections served at once (the trainer opens judge.concurrency); more get 503")
    p.add_argument("--backlog", type=int, default=128, help="listen backlog: connections waiting to be accepted")
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
    for name in ("max_batch", "max_logprobs", "max_images", "max_connections", "backlog"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not args.socket_timeout > 0 or not args.max_body_mb > 0:
        p.error("--socket-timeout and --max-body-mb must be > 0")
    # both checks come before the model loads: a typo must not cost minutes of loading
    if _model_dir_missing(args.model):
        _fail(f"judge model directory not found: {args.model}")
    try:
        sock = bind_listener(args.host, args.port, args.backlog)
    except OSError as err:
        _fail(f"cannot listen on {args.host}:{args.port}: {err.strerror or err} (is another server using the "
              "port? pick another with --port, or --port 0 for any free one)")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"warning: serving on {args.host} without an API key: anyone who reaches it can use the judge",
              file=sys.stderr)
    try:
        judge = TransformersJudge(args.model, dtype=args.dtype, device=args.device, batch_size=args.max_batch,
                                  attn_implementation=args.attn_implementation, max_pixels=args.max_pixels)
        server = JudgeServer(judge, model_name=args.served_model_name or args.model, api_key=api_key,
                             max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
                             max_logprobs=args.max_logprobs, max_images=args.max_images,
                             max_body_mb=args.max_body_mb, max_image_pixels=args.max_image_pixels,
                             max_request_pixels=args.max_request_pixels, socket_timeout=args.socket_timeout,
                             max_connections=args.max_connections, backlog=args.backlog, sock=sock)
    except ValueError as err:   # an unloadable model or inconsistent limits: the message says which
        sock.close()
        _fail(str(err).replace("\n", " "))
    print(f"judge {args.model} served at {server.url} (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


if __name__ == "__main__":
    main()
