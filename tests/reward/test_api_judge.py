"""The OpenAI-API judge against small fake servers: retries, failures, floors, payloads, concurrency."""
import hashlib
import json
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from reward.judge import JudgeError
from reward.judges.api_judge import OpenAIJudge, label_log_probs
from reward.vlm.chat_wire import decode_image_data_url


def _answer(top: dict[str, float]) -> dict:
    entries = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top.items()]
    best = max(entries, key=lambda e: e["logprob"])
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": best["token"]},
                         "logprobs": {"content": [{**best, "top_logprobs": entries}]}}]}


class FakeServer:
    """Answers POSTs with `behaviour(n, payload) -> (status, body dict or raw bytes, delay_s)`; records what it saw."""

    def __init__(self, behaviour):
        self.behaviour, self.payloads, self.in_flight, self.max_in_flight = behaviour, [], 0, 0
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802 - /v1/models, for OpenAIJudge.ping
                data = json.dumps({"data": [{"id": "judge"}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):  # noqa: N802
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake._lock:
                    fake.payloads.append(payload)
                    n = len(fake.payloads)
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                status, body, delay = fake.behaviour(n, payload)
                time.sleep(delay)
                with fake._lock:
                    fake.in_flight -= 1
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:   # the client gave up (timeout tests)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake_server():
    servers = []

    def start(behaviour):
        servers.append(FakeServer(behaviour))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


YES_70 = _answer({"Yes": math.log(0.7), "No": math.log(0.3), "Maybe": math.log(0.001)})


def _judge(url, **kw):
    kw.setdefault("backoff", 0.01)
    return OpenAIJudge(url, "judge", **kw)


def test_server_errors_are_retried_until_an_answer(fake_server, make_requests):
    server = fake_server(lambda n, p: (500, {"error": "busy"}, 0) if n <= 2 else (200, YES_70, 0))
    judge = _judge(server.url, retries=3)
    scores = judge.score(make_requests()[:1], "yesno")
    assert torch.allclose(scores, torch.tensor([0.7]), atol=1e-6)
    assert judge.attempts == 3


def test_persistent_failure_is_a_judge_error_never_a_zero_reward(fake_server, make_requests):
    server = fake_server(lambda n, p: (503, {"error": "overloaded"}, 0))
    judge = _judge(server.url, retries=2)
    with pytest.raises(JudgeError, match=r"/v1/chat/completions failed after 3 attempt.*HTTP 503.*overloaded"):
        judge.score(make_requests()[:1], "yesno")
    assert len(server.payloads) == 3


def test_rejected_request_is_not_retried(fake_server, make_requests):
    server = fake_server(lambda n, p: (400, {"error": "bad image"}, 0))
    with pytest.raises(JudgeError, match="rejected the request with HTTP 400.*bad image"):
        _judge(server.url, retries=4).score(make_requests()[:1], "score")
    assert len(server.payloads) == 1


def test_timeouts_are_retried_then_reported(fake_server, make_requests):
    server = fake_server(lambda n, p: (200, YES_70, 0.6 if n == 1 else 0))
    judge = _judge(server.url, retries=1, timeout=0.2)
    assert torch.allclose(judge.score(make_requests()[:1], "yesno"), torch.tensor([0.7]), atol=1e-6)
    slow = fake_server(lambda n, p: (200, YES_70, 0.6))
    with pytest.raises(JudgeError, match="failed after 2 attempt.*timed out"):
        _judge(slow.url, retries=1, timeout=0.2).score(make_requests()[:1], "yesno")


def test_unreachable_server_fails_fast_with_the_fix(make_requests):
    with socket.socket() as s:   # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = _judge(f"http://127.0.0.1:{port}/v1", retries=5, backoff=1.0)
    tic = time.perf_counter()
    with pytest.raises(JudgeError, match=rf"127.0.0.1:{port}/v1.*connection refused.*python -m reward.serve"):
        judge.score(make_requests()[:1], "score")
    assert judge.attempts == 1 and time.perf_counter() - tic < 5.0   # no backoff spent on a server never seen


def test_missing_label_gets_the_documented_floor():
    top = [{"token": "Yes", "logprob": -0.5}, {"token": "Hmm", "logprob": -2.0}]
    assert label_log_probs(top, ("Yes", "No"), "s") == [-0.5, -2.0 - math.log(2)]
    with pytest.raises(JudgeError, match="none of the label tokens"):
        label_log_probs([{"token": "Hmm", "logprob": -0.1}], ("Yes", "No"), "s")
    with pytest.raises(JudgeError, match="malformed"):
        label_log_probs([{"token": "Yes"}], ("Yes", "No"), "s")


def test_score_mode_reads_digits_with_floors(fake_server, make_requests):
    # "3" and "5" returned; 0, 1, 2, 4 floored at min - log 2
    answer = _answer({"3": math.log(0.5), "5": math.log(0.3), "x": math.log(0.1)})
    server = fake_server(lambda n, p: (200, answer, 0))
    score = _judge(server.url, max_floored_share=1.0).score(make_requests()[:1], "score")
    lp = torch.full((6,), math.log(0.1) - math.log(2), dtype=torch.float64)
    lp[3], lp[5] = math.log(0.5), math.log(0.3)
    expected = (torch.softmax(lp, 0) * torch.arange(6.0, dtype=torch.float64)).sum() / 5
    assert torch.allclose(score.double(), expected[None], atol=1e-6)


def test_payload_and_concurrency(fake_server, make_requests):
    server = fake_server(lambda n, p: (200, YES_70, 0.15))
    ids = {t: i for i, t in enumerate(["Yes", "No", "0", "1", "2", "3", "4", "5"], start=100)}
    judge = _judge(server.url, concurrency=4, label_token_ids=ids, top_logprobs=7, both_orders=True,
                   show_crop=True, crop_size=16, api_key="k")
    reqs = make_requests()
    scores = judge.score(reqs, "pairwise")
    # both orders: (0.7 + 1 - 0.7) / 2 for every request
    assert torch.allclose(scores, torch.full((len(reqs),), 0.5), atol=1e-6)
    assert len(server.payloads) == 2 * len(reqs) and server.max_in_flight > 1
    p = server.payloads[0]
    assert p["max_tokens"] == 1 and p["logprobs"] is True and p["top_logprobs"] == 7
    assert p["logprob_token_ids"] == [100, 101] and p["model"] == "judge"
    parts = p["messages"][-1]["content"]
    urls = [x["image_url"]["url"] for x in parts if x["type"] == "image_url"]
    assert len(urls) == 5 and all(u.startswith("data:image/png;base64,") for u in urls)  # source, 2 + 2 crops
    # 8-bit images cross exactly (requests run concurrently: the first payload to arrive can be any one)
    assert any(torch.equal(decode_image_data_url(urls[0]), r.source) for r in reqs)
    assert decode_image_data_url(urls[3]).shape == (3, 16, 16)


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="base_url"):
        OpenAIJudge("localhost:8000", "m")
    with pytest.raises(ValueError, match="concurrency"):
        OpenAIJudge("http://127.0.0.1:1/v1", "m", concurrency=0)
    with pytest.raises(ValueError, match="label_token_ids lacks"):
        OpenAIJudge("http://127.0.0.1:1/v1", "m", label_token_ids={"Yes": 1, "No": 2})


# -- floors are counted, exposed and bounded --------------------------------------------------------

def test_floors_are_counted_and_a_request_over_the_share_fails(fake_server, make_requests):
    # two of six digits missing: share 1/3, within the default 0.34, and reported
    two_missing = _answer({"0": -3.0, "1": -2.0, "2": -1.5, "3": -1.0, "x": -4.0})
    judge = _judge(fake_server(lambda n, p: (200, two_missing, 0)).url)
    assert judge.max_floored_share == 0.34 and judge.last_floored_share == 0.0
    judge.score(make_requests()[:2], "score")
    assert judge.last_floored_share == pytest.approx(2 / 6)
    assert judge.floor_stats == {"requests": 2, "labels": 12, "floored_labels": 4, "floored_requests": 2,
                                 "refused_requests": 0}
    # "No" missing from a yes/no answer: half the labels floored, so the request fails with the fix
    only_yes = _answer({"Yes": math.log(0.9), "x": math.log(0.05)})
    server = fake_server(lambda n, p: (200, only_yes, 0))
    judge = _judge(server.url, retries=3)
    with pytest.raises(JudgeError, match=r"\['No'\].*share 0.50 > max_floored_share 0.34.*raise top_logprobs "
                                         r"\(now 20\).*logprob_token_ids.*judge.tokenizer"):
        judge.score(make_requests()[:1], "yesno")
    assert judge.attempts == 1 and judge.floor_stats["refused_requests"] == 1   # not retried: it cannot change
    # the bound is the caller's: 0 forbids any floor, 1 allows them all
    strict = _judge(fake_server(lambda n, p: (200, two_missing, 0)).url, max_floored_share=0.0)
    with pytest.raises(JudgeError, match="max_floored_share 0.0"):
        strict.score(make_requests()[:1], "score")
    lenient = _judge(server.url, max_floored_share=1.0)
    assert 0.9 < float(lenient.score(make_requests()[:1], "yesno")) < 1 and lenient.last_floored_share == 0.5
    with pytest.raises(ValueError, match="max_floored_share"):
        _judge(server.url, max_floored_share=1.5)


# -- answers that must end in a JudgeError, never in a reward --------------------------------------

def test_an_answer_without_logprobs_is_a_judge_error(fake_server, make_requests):
    no_logprobs = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Yes"}, "logprobs": None}]}
    server = fake_server(lambda n, p: (200, no_logprobs, 0))
    judge = _judge(server.url, retries=3)
    with pytest.raises(JudgeError, match="returned no logprobs.*logprobs=true"):
        judge.score(make_requests()[:1], "yesno")
    assert judge.attempts == 1


@pytest.mark.parametrize("bad, match", [(float("nan"), "NaN logprob"), (0.5, "not a log-probability")])
def test_a_nan_or_positive_logprob_is_a_judge_error(fake_server, make_requests, bad, match):
    answer = _answer({"Yes": math.log(0.7), "No": math.log(0.3)})
    answer["choices"][0]["logprobs"]["content"][0]["top_logprobs"][1]["logprob"] = bad   # sent as NaN / 0.5
    server = fake_server(lambda n, p: (200, answer, 0))
    with pytest.raises(JudgeError, match=match):
        _judge(server.url).score(make_requests()[:1], "yesno")


def test_a_non_json_answer_is_retried_then_a_judge_error(fake_server, make_requests):
    server = fake_server(lambda n, p: (200, b"<html>502 from a proxy</html>", 0))
    judge = _judge(server.url, retries=2)
    with pytest.raises(JudgeError, match=r"failed after 3 attempt.*not JSON.*<html>"):
        judge.score(make_requests()[:1], "yesno")
    assert judge.attempts == 3


def test_a_refused_connection_after_a_success_is_retried_then_a_judge_error(fake_server, make_requests):
    server = fake_server(lambda n, p: (200, YES_70, 0))
    judge = _judge(server.url, retries=2)
    assert torch.allclose(judge.score(make_requests()[:1], "yesno"), torch.tensor([0.7]), atol=1e-6)
    server.close()   # the server goes away (a restart): refusals are now worth retrying
    with pytest.raises(JudgeError, match=r"failed after 3 attempt.*(refused|ConnectionRefused)"):
        judge.score(make_requests()[:1], "yesno")
    assert judge.attempts == 1 + 3


# -- several endpoints (judge.base_url a list) ---------------------------------------------------

def _by_content(n, payload):
    """A deterministic answer that depends on the request's images (so order mix-ups show), after a
    random delay (so requests finish out of order)."""
    digest = hashlib.sha256(json.dumps(payload["messages"]).encode()).digest()
    p_yes = 0.1 + 0.8 * digest[0] / 255
    return 200, _answer({"Yes": math.log(p_yes), "No": math.log(1 - p_yes)}), 0.002 * (digest[1] % 20)


def _dead_url():
    with socket.socket() as s:   # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


def test_requests_spread_over_endpoints_and_scores_keep_their_order(fake_server, make_requests):
    a, b = fake_server(_by_content), fake_server(_by_content)
    reqs = make_requests() + make_requests(seed=1) + make_requests(seed=2) + make_requests(seed=3)
    want = _judge(a.url, concurrency=1).score(reqs, "yesno")       # one server, one request at a time
    a.payloads.clear()
    judge = _judge([a.url, b.url], concurrency=2)
    assert judge.ping() == ["judge"] and judge.base_urls == [a.url, b.url]
    assert torch.equal(judge.score(reqs, "yesno"), want)
    assert len(a.payloads) + len(b.payloads) == len(reqs) == 16
    assert min(len(a.payloads), len(b.payloads)) >= 5            # least-outstanding: both do a fair share
    assert max(a.max_in_flight, b.max_in_flight) <= 2            # judge.concurrency is per endpoint
    stats = judge.endpoint_stats()
    assert sum(s["attempts"] for s in stats.values()) == 16 and all(s["failed"] == 0 for s in stats.values())


def test_a_down_endpoint_requests_go_to_the_others_at_once(fake_server, make_requests):
    ok = fake_server(lambda n, p: (200, YES_70, 0))
    reqs = make_requests() * 2
    # never started (connection refused): its requests move on; the judge keeps scoring
    dead = _dead_url()
    judge = _judge([dead, ok.url], retries=1, backoff=5.0)
    tic = time.perf_counter()
    assert torch.allclose(judge.score(reqs, "yesno"), torch.full((8,), 0.7), atol=1e-6)
    # overloaded (503 on every request): with one retry each, the retry must have gone to the other
    busy = fake_server(lambda n, p: (503, {"error": "overloaded"}, 0))
    judge2 = _judge([busy.url, ok.url], retries=1, backoff=5.0)
    assert torch.allclose(judge2.score(reqs, "yesno"), torch.full((8,), 0.7), atol=1e-6)
    assert time.perf_counter() - tic < 3.0                       # moving on costs no backoff (5 s)
    assert judge.endpoint_stats()[dead]["failed"] >= 1 and judge2.endpoint_stats()[busy.url]["failed"] >= 1
    assert len(busy.payloads) >= 1 and judge2.endpoint_stats()[busy.url]["attempts"] < 8  # set aside, not hammered
    # a server that stops mid-run (answered before, now refused): the rest carry on
    other = fake_server(lambda n, p: (200, YES_70, 0))
    judge3 = _judge([other.url, ok.url], retries=2)
    judge3.score(reqs, "yesno")
    other.close()
    assert torch.allclose(judge3.score(reqs, "yesno"), torch.full((8,), 0.7), atol=1e-6)


def test_every_endpoint_failing_is_a_judge_error_naming_each(fake_server, make_requests):
    a = fake_server(lambda n, p: (503, {"error": "overloaded"}, 0))
    b = fake_server(lambda n, p: (500, {"error": "crashed"}, 0))
    with pytest.raises(JudgeError) as err:
        _judge([a.url, b.url], retries=2).score(make_requests()[:1], "yesno")
    message = str(err.value)
    assert "failed after 3 attempt(s) over 2 of 2 endpoints" in message
    assert f"{a.url}/chat/completions: HTTP 503" in message and f"{b.url}/chat/completions: HTTP 500" in message
    # a rejected request (400) is not retried elsewhere: it names the endpoint that rejected it
    c = fake_server(lambda n, p: (400, {"error": "bad image"}, 0))
    with pytest.raises(JudgeError, match=rf"{c.url}/chat/completions rejected the request with HTTP 400"):
        _judge([c.url], retries=3).score(make_requests()[:1], "yesno")
    # none ever reachable: fails at once, naming them all, with the fix
    dead1, dead2 = _dead_url(), _dead_url()
    judge = _judge([dead1, dead2], retries=5, backoff=1.0)
    with pytest.raises(JudgeError, match=rf"{dead1}/chat/completions, {dead2}/chat/completions.*connection refused"):
        judge.score(make_requests()[:1], "yesno")
    assert judge.attempts == 2
    # ping names the endpoint that is down; the list must be URLs, each once
    ok = fake_server(lambda n, p: (200, YES_70, 0))
    with pytest.raises(JudgeError, match=rf"judge server {dead1} did not list its models") as err:
        _judge([ok.url, dead1]).ping()
    assert ok.url not in str(err.value)
    with pytest.raises(ValueError, match="names a server twice"):
        OpenAIJudge([ok.url, ok.url + "/"], "judge")
    with pytest.raises(ValueError, match="base_url"):
        OpenAIJudge([], "judge")
