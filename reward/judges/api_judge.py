"""A VLM judge behind an OpenAI-compatible chat-completions server (vLLM, or `python -m reward.serve`).

Each conversation is one request: images as base64 PNG data URLs, `max_tokens=1`, `logprobs=true`
with `top_logprobs`, and, when label token ids are given, `logprob_token_ids` (vLLM returns those
tokens' log-probabilities next to the top ones). The label distribution is read from the returned
log-probabilities exactly as the in-process judge reads it from logits.

A label missing from the returned list had less probability than every token that was returned,
so its log-probability is taken as the smallest returned one minus log(2) (half that token's
probability), a documented floor, not a crash. The floor is a guess that moves the score (two of
six digits floored have moved one by 0.045), so floors are counted and bounded: a request
(one conversation) whose floored share of the mode's labels exceeds `max_floored_share` fails
with a JudgeError that says to raise `top_logprobs` or send `logprob_token_ids` (give
`label_token_ids`; the trainer does with judge.tokenizer). `last_floored_share` and `floor_stats`
report the floors for logging. If no label at all is returned the request fails: guessing would
invent a reward. A NaN or positive log-probability is a server fault and fails too.

Requests run concurrently in a thread pool. Timeouts, connection errors, 408, 429 and 5xx are
retried with exponential backoff and jitter; after the last retry a JudgeError names the URL and
the last failure. A refused connection before the server has ever answered fails at once with
the fix (start the server); later refusals (a restarting server) are retried like the rest.
Other 4xx answers and malformed responses fail at once: retrying cannot fix them.

Several servers of the same model (`base_url` a list of URLs): each request goes to the endpoint
with the fewest requests in flight that is not cooling down after a failure (ties in turn), so a
batch spreads over them and a slow one gets less. A retryable failure puts its endpoint aside for
a backoff that doubles with its consecutive failures, and the request's next attempt goes to
another endpoint at once (no wait); only when every endpoint has failed does a retry wait. A
request still has `retries + 1` attempts in all. A refused connection from an endpoint never
reached moves the request on while another endpoint remains, and fails at once only when every
endpoint has refused so. Errors name the endpoint; after the last retry, every endpoint tried and
its last failure. `endpoint_stats()` counts each endpoint's attempts and failures.
"""
from __future__ import annotations

import json
import math
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor

from reward.judge import (
    Judge,
    JudgeError,
    JudgeRequest,
    Mode,
    check_mode,
    check_scores,
)
from reward.vlm.chat_wire import to_openai_messages
from reward.vlm.labels import scores_from_label_probs
from reward.vlm.prompts import LABELS, Conversation, JudgeTemplates, build_conversations
from reward.vlm.views import JudgeView

_RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
_LOGPROB_SLACK = 1e-4   # rounding can put log(1) a hair above 0; anything more is not a log-probability


class _Retryable(Exception):
    """A failure worth another attempt (the message says what happened)."""


class _RefusedUnseen(_Retryable):
    """A refused connection from an endpoint that has never answered (not started, or a wrong URL)."""


class _Endpoint:
    """One server of the judge, and what the client knows about it (guarded by the judge's lock)."""

    def __init__(self, base_url: str):
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.reached = False       # has answered anything (a refusal after that is a restart)
        self.refused_unseen = False
        self.in_flight = 0
        self.failures = 0          # consecutive retryable failures
        self.down_until = 0.0      # time.monotonic() before which another endpoint is preferred
        self.attempts = 0
        self.failed = 0


def _refused(err: BaseException) -> bool:
    reason = getattr(err, "reason", err)
    return isinstance(reason, ConnectionRefusedError) or isinstance(err, ConnectionRefusedError)


def read_label_log_probs(top_logprobs: list[dict[str, Any]], labels: tuple[str, ...],
                         where: str) -> tuple[list[float], list[str]]:
    """The labels' log-probabilities from one position's returned list, and the labels floored.

    Entries are {"token": text, "logprob": float}; a label matches a token's exact text. A label
    absent from the list gets min(returned logprobs) - log(2); no label present is a JudgeError,
    and so is a NaN or positive log-probability (a server fault, not a distribution).
    """
    found: dict[str, float] = {}
    returned: list[float] = []
    for entry in top_logprobs:
        try:
            token, lp = entry["token"], float(entry["logprob"])
        except (KeyError, TypeError, ValueError) as err:
            raise JudgeError(f"{where}: malformed top_logprobs entry {entry!r}") from err
        if math.isnan(lp):
            raise JudgeError(f"{where}: NaN logprob for token {token!r}")
        if lp > _LOGPROB_SLACK:
            raise JudgeError(f"{where}: logprob {lp} > 0 for token {token!r}: not a log-probability")
        returned.append(lp)
        if token in labels and token not in found:
            found[token] = lp
    if not found:
        seen = [e.get("token") for e in top_logprobs[:10]]
        raise JudgeError(
            f"{where}: none of the label tokens {list(labels)} is among the {len(top_logprobs)} returned "
            f"logprobs (first: {seen}); raise top_logprobs, pass label_token_ids so the server returns them "
            "(vLLM: logprob_token_ids), or check that the chat template makes the model answer with a label")
    floor = min(returned) - math.log(2.0)
    return [found.get(label, floor) for label in labels], [label for label in labels if label not in found]


def label_log_probs(top_logprobs: list[dict[str, Any]], labels: tuple[str, ...], where: str) -> list[float]:
    """The labels' log-probabilities (floored when missing); see `read_label_log_probs`."""
    return read_label_log_probs(top_logprobs, labels, where)[0]


class OpenAIJudge(Judge):
    """Scores requests through an OpenAI-compatible server with logprobs.

    `base_url` ends in /v1 (e.g. http://127.0.0.1:8000/v1); a list of such URLs names several
    servers of the same model, balanced (the module docstring). `model` is the served model name;
    `concurrency` is the requests in flight per endpoint.
    `label_token_ids` maps label text ("Yes", "No", "0".."5") to token ids; when given, the ids of
    the mode's labels are sent as `logprob_token_ids` (set `send_logprob_token_ids=False` for servers
    that reject the field). The wording and the images shown match `TransformersJudge` with the same
    options, so both backends score the same requests alike.

    Floors (labels missing from the returned log-probabilities, see the module docstring): a
    request whose floored share of labels exceeds `max_floored_share` fails (0 forbids floors,
    1 allows any). For logging, `last_floored_share` is the share of floored labels over all
    requests of the last successful `score`/`label_probs` call, and `floor_stats` counts since
    construction: "requests" answered, "labels" read, "floored_labels", "floored_requests" (with
    at least one floor) and "refused_requests" (over `max_floored_share`).
    """

    differentiable = False

    def __init__(self, base_url: str | Sequence[str], model: str, *, api_key: str | None = None,
                 concurrency: int = 16,
                 timeout: float = 60.0, retries: int = 5, backoff: float = 0.5, max_backoff: float = 30.0,
                 top_logprobs: int = 20, label_token_ids: Mapping[str, int] | None = None,
                 send_logprob_token_ids: bool = True, both_orders: bool = False, show_crop: bool = False,
                 crop_margin: float = 0.25, crop_size: int = 224, show_source: bool = True,
                 templates: JudgeTemplates | Mapping[str, str] | str | os.PathLike | None = None,
                 max_floored_share: float = 0.34):
        urls = [base_url] if isinstance(base_url, str) else list(base_url) if isinstance(base_url, Sequence) else []
        if not urls or not all(isinstance(u, str) and u.startswith(("http://", "https://")) for u in urls):
            raise ValueError(f"base_url must be an http(s) URL such as http://127.0.0.1:8000/v1 (or a list of them), "
                             f"got {base_url!r}")
        if len({u.rstrip("/") for u in urls}) != len(urls):
            raise ValueError(f"base_url names a server twice: {urls}")
        for name, value, low in (("concurrency", concurrency, 1), ("retries", retries, 0),
                                 ("top_logprobs", top_logprobs, 0)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        for name, value in (("timeout", timeout), ("backoff", backoff), ("max_backoff", max_backoff)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {value!r}")
        if not 0.0 <= max_floored_share <= 1.0:
            raise ValueError(f"max_floored_share must be in [0, 1], got {max_floored_share!r}")
        self.max_floored_share = float(max_floored_share)
        self.last_floored_share = 0.0
        self.floor_stats = {"requests": 0, "labels": 0, "floored_labels": 0, "floored_requests": 0,
                            "refused_requests": 0}
        self.endpoints = [_Endpoint(u) for u in urls]
        self.model = model
        self.api_key = api_key
        self.concurrency = concurrency
        self.timeout, self.retries = float(timeout), retries
        self.backoff, self.max_backoff = float(backoff), float(max_backoff)
        self.top_logprobs = top_logprobs
        self.label_token_ids = dict(label_token_ids) if label_token_ids is not None else None
        if self.label_token_ids is not None:
            missing = [lb for labels in LABELS.values() for lb in labels if lb not in self.label_token_ids]
            if missing:
                raise ValueError(f"label_token_ids lacks {sorted(set(missing))}; give the id of every label "
                                 "(see reward.vlm.labels.label_token_ids for a tokenizer's ids)")
        self.send_logprob_token_ids = send_logprob_token_ids
        self.both_orders = both_orders
        self.view = JudgeView(show_source=show_source, crop=show_crop, crop_margin=crop_margin, crop_size=crop_size)
        self.templates = templates if isinstance(templates, JudgeTemplates) else JudgeTemplates.from_config(templates)
        self._pool = ThreadPoolExecutor(max_workers=concurrency * len(urls), thread_name_prefix="judge-http")
        self.attempts = 0                   # HTTP attempts made, all endpoints (for logs and tests)
        self._turn = 0                      # round-robin start among equally loaded endpoints
        self._lock = threading.Lock()

    @property
    def base_urls(self) -> list[str]:
        return [e.base_url for e in self.endpoints]

    def endpoint_stats(self) -> dict[str, dict[str, int]]:
        """Per endpoint (base URL): HTTP attempts sent, retryable failures, requests in flight now."""
        with self._lock:
            return {e.base_url: {"attempts": e.attempts, "failed": e.failed, "in_flight": e.in_flight}
                    for e in self.endpoints}

    # -- one HTTP request ---------------------------------------------------------------------
    def _payload(self, conversation: Conversation, mode: str) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.model, "messages": to_openai_messages(conversation), "max_tokens": 1,
            "temperature": 0.0, "logprobs": True, "top_logprobs": self.top_logprobs,
        }
        if self.label_token_ids is not None and self.send_logprob_token_ids:
            payload["logprob_token_ids"] = [self.label_token_ids[lb] for lb in LABELS[mode]]
        return payload

    def _post_once(self, endpoint: _Endpoint, body: bytes) -> dict[str, Any]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(endpoint.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                endpoint.reached = True
                raw = resp.read()
        except urllib.error.HTTPError as err:
            endpoint.reached = True
            detail = err.read()[:500].decode("utf-8", "replace")
            if err.code in _RETRY_STATUS:
                raise _Retryable(f"HTTP {err.code}: {detail}") from err
            raise JudgeError(
                f"judge server {endpoint.url} rejected the request with HTTP {err.code}: {detail}") from err
        except (urllib.error.URLError, OSError) as err:
            if _refused(err) and not endpoint.reached:
                raise _RefusedUnseen(f"connection refused ({getattr(err, 'reason', err)})") from err
            raise _Retryable(f"{type(err).__name__}: {getattr(err, 'reason', err)}") from err
        try:
            return json.loads(raw)
        except json.JSONDecodeError as err:
            raise _Retryable(f"response is not JSON: {raw[:200]!r}") from err

    def _pick(self, failed_here: set[int]) -> tuple[int, bool]:
        """(the endpoint for a request's next attempt, whether to back off first) — under the lock.

        Prefer endpoints that have not failed this request and are not cooling down, then the fewest
        in flight, ties in turn; when every endpoint is set aside, the one whose cool-down ends first
        (one that has answered before one that never did), after a backoff if this request has failed
        (a request's first attempt never waits: one failure elsewhere does not hold up the batch)."""
        now = time.monotonic()
        n = len(self.endpoints)
        order = [(self._turn + k) % n for k in range(n)]
        self._turn = (self._turn + 1) % n
        fresh = [i for i in order if i not in failed_here and self.endpoints[i].down_until <= now]
        if fresh:
            return min(fresh, key=lambda i: self.endpoints[i].in_flight), False
        usable = [i for i in order if not self.endpoints[i].refused_unseen] or order
        return min(usable, key=lambda i: self.endpoints[i].down_until), bool(failed_here)

    def _post(self, payload: dict[str, Any]) -> tuple[dict[str, Any], _Endpoint]:
        """One request, retried over the endpoints (the module docstring); the answer and who gave it."""
        body = json.dumps(payload).encode("utf-8")
        last: dict[int, str] = {}       # endpoint index -> its last failure for this request
        waits = 0
        for _ in range(self.retries + 1):
            with self._lock:  # chosen and counted at once, so concurrent requests see each other
                i, wait = self._pick(set(last))
                endpoint = self.endpoints[i]
                self.attempts += 1
                endpoint.attempts += 1
                endpoint.in_flight += 1
            try:
                if wait:
                    delay = min(self.max_backoff, self.backoff * 2 ** waits)
                    waits += 1
                    time.sleep(delay * (0.5 + 0.5 * random.random()))   # jitter spreads out concurrent retries
                data = self._post_once(endpoint, body)
            except _Retryable as err:
                with self._lock:
                    endpoint.in_flight -= 1
                    endpoint.failed += 1
                    endpoint.failures += 1
                    endpoint.down_until = time.monotonic() + min(
                        self.max_backoff, self.backoff * 2 ** (endpoint.failures - 1))
                    if isinstance(err, _RefusedUnseen):
                        endpoint.refused_unseen = True
                    never_reached = all(e.refused_unseen and not e.reached for e in self.endpoints)
                last[i] = str(err)
                if never_reached:
                    raise self._unreachable() from err
                continue
            except BaseException:
                with self._lock:
                    endpoint.in_flight -= 1
                raise
            with self._lock:
                endpoint.in_flight -= 1
                endpoint.failures, endpoint.down_until, endpoint.refused_unseen = 0, 0.0, False
            return data, endpoint
        if len(self.endpoints) == 1:
            raise JudgeError(f"judge server {self.endpoints[0].url} failed after {self.retries + 1} attempt(s); "
                             f"last failure: {last[0]}")
        tried = "; ".join(f"{self.endpoints[i].url}: {msg}" for i, msg in last.items())
        raise JudgeError(f"judge servers failed after {self.retries + 1} attempt(s) over {len(last)} of "
                         f"{len(self.endpoints)} endpoints; last failure of each: {tried}")

    def _unreachable(self) -> JudgeError:
        """Every endpoint refused the connection without ever answering: not started, or a wrong URL."""
        urls = ", ".join(e.url for e in self.endpoints)
        where = "the judge server at" if len(self.endpoints) == 1 else "any of the judge servers at"
        return JudgeError(
            f"cannot connect to {where} {urls} (connection refused). Start it first: "
            "`python -m reward.serve --model DIR --port PORT` or `vllm serve MODEL --max-logprobs 20`, "
            "and check judge.base_url")

    def _label_log_probs(self, conversation: Conversation, mode: str) -> tuple[list[float], int]:
        """One request: the mode's label log-probabilities and how many of them were floored."""
        data, endpoint = self._post(self._payload(conversation, mode))
        where = f"judge server {endpoint.url}"
        try:
            position = data["choices"][0]["logprobs"]["content"][0]
            top = list(position.get("top_logprobs") or [])
        except (KeyError, IndexError, TypeError, AttributeError) as err:
            raise JudgeError(f"{where} returned no logprobs for the first token (does it support logprobs=true?): "
                             f"{json.dumps(data)[:300]}") from err
        if "token" in position and "logprob" in position:
            top.append({"token": position["token"], "logprob": position["logprob"]})  # the generated token
        labels = LABELS[mode]
        lps, floored = read_label_log_probs(top, labels, where)
        share = len(floored) / len(labels)
        refused = share > self.max_floored_share
        with self._lock:
            stats = self.floor_stats
            stats["requests"] += 1
            stats["labels"] += len(labels)
            stats["floored_labels"] += len(floored)
            stats["floored_requests"] += bool(floored)
            stats["refused_requests"] += refused
        if refused:
            sent_ids = self.label_token_ids is not None and self.send_logprob_token_ids
            fix = (f"raise top_logprobs (now {self.top_logprobs}): the server ignored the logprob_token_ids sent"
                   if sent_ids else f"raise top_logprobs (now {self.top_logprobs}) or send logprob_token_ids by "
                   "giving label_token_ids (in the trainer: set judge.tokenizer)")
            raise JudgeError(
                f"{where}: the labels {floored} were not among the {len(top)} returned logprobs; flooring "
                f"{len(floored)} of {len(labels)} (share {share:.2f} > max_floored_share {self.max_floored_share}) "
                f"would bias the score, so {fix}")
        return lps, len(floored)

    # -- the judge interface ------------------------------------------------------------------
    def label_probs(self, conversations: list[Conversation], mode: str) -> Tensor:
        """[N, n_labels] float64: the returned label distribution of each conversation."""
        check_mode(mode)
        futures = [self._pool.submit(self._label_log_probs, c, mode) for c in conversations]
        try:
            answers = [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        slots = len(answers) * len(LABELS[mode])
        self.last_floored_share = sum(n for _, n in answers) / slots if slots else 0.0
        rows = [lps for lps, _ in answers]
        return torch.softmax(torch.tensor(rows, dtype=torch.float64).reshape(len(rows), len(LABELS[mode])), dim=-1)

    def score(self, requests: list[JudgeRequest], mode: Mode = "score") -> Tensor:
        check_mode(mode)
        if not requests:
            return torch.zeros(0)
        conversations = build_conversations(requests, mode, self.templates, self.view, both_orders=self.both_orders)
        scores = scores_from_label_probs(self.label_probs(conversations, mode), mode, both_orders=self.both_orders)
        return check_scores(scores.float().to(requests[0].edited.device), len(requests), "OpenAIJudge")

    def ping(self) -> list[str]:
        """The served model names (GET /models) of the first endpoint: a quick check that every
        endpoint is up and serves `model` (a JudgeError names each that is not)."""
        problems, first = [], None
        for endpoint in self.endpoints:
            req = urllib.request.Request(endpoint.base_url + "/models", headers=(
                {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}))
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    names = [m["id"] for m in json.loads(resp.read())["data"]]
            except (urllib.error.URLError, OSError, KeyError, TypeError, json.JSONDecodeError) as err:
                problems.append(f"judge server {endpoint.base_url} did not list its models ({err}); is it running? "
                                "Start `python -m reward.serve --model DIR` or vLLM")
                continue
            endpoint.reached = True
            if self.model not in names:
                problems.append(f"judge server {endpoint.base_url} serves {names}, not {self.model!r}: set judge.model")
            first = names if first is None else first
        if problems:
            raise JudgeError("; ".join(problems))
        return first

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
