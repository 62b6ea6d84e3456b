"""`reward.serve` against hostile or broken clients: framing, pixel caps, slow clients, bad bodies,
start-up failures, and what is reproducible about served scores. Every socket read has a timeout."""
import base64
import io
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch
from PIL import Image, ImageFile

import reward.serve as serve
from reward.judges.api_judge import OpenAIJudge
from reward.judges.vlm_judge import TransformersJudge
from reward.serve import JudgeServer
from reward.vlm.labels import label_token_id_map

READ_TIMEOUT = 5.0


@pytest.fixture
def make_server(tiny_vlm):
    servers = []

    def start(**kw):
        kw = {"port": 0, "model_name": "tiny", "batch_wait_ms": 1} | kw
        servers.append(JudgeServer(TransformersJudge(tiny_vlm), **kw).start())
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def _address(server):
    return server.httpd.server_address[:2]


def _exchange(server, data: bytes, timeout: float = READ_TIMEOUT) -> bytes:
    """Send raw bytes, read until the server closes; a server that never closes fails the test."""
    with socket.create_connection(_address(server), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def _statuses(raw: bytes) -> list[int]:
    return [int(line.split()[1]) for line in raw.split(b"\r\n") if line.startswith(b"HTTP/1.1 ")]


def _post(server, body, key=None, timeout=30):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    req = urllib.request.Request(server.url + "/chat/completions", data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _png_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _chat(*urls: str) -> dict:
    parts = [{"type": "text", "text": "Is it fine? Reply Yes or No."}]
    parts += [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return {"max_tokens": 1, "logprobs": True, "top_logprobs": 2, "messages": [{"role": "user", "content": parts}]}


SMUGGLED = b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n"   # what a body read as a next request would run


# -- A: request framing ---------------------------------------------------------------------------

@pytest.mark.parametrize("headers, status", [
    (b"Content-Length: -1\r\n", 400),                       # used to read to the end of the stream
    (b"Transfer-Encoding: chunked\r\n", 411),               # used to parse the chunks as a next request
    (b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", 411),
    (b"", 411),                                             # no length at all
    (b"Content-Length: 5\r\nContent-Length: 7\r\n", 400),
    (b"Content-Length: 0x10\r\n", 400),
    (b"Content-Length: 999999999999\r\n", 413),
])
def test_bad_framing_is_refused_and_the_connection_closed(make_server, headers, status):
    server = make_server()
    body = b"%x\r\n" % len(SMUGGLED) + SMUGGLED + b"\r\n0\r\n\r\n" if b"chunked" in headers else SMUGGLED
    raw = _exchange(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n" + headers + b"\r\n" + body)
    assert _statuses(raw) == [status], raw[:300]   # one answer: the body never ran as a request
    assert b"Connection: close" in raw


def test_a_refused_api_key_does_not_run_the_body_as_a_request(make_server):
    server = make_server(api_key="secret")
    raw = _exchange(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer nope\r\n"
                    b"Content-Length: %d\r\n\r\n" % len(SMUGGLED) + SMUGGLED)
    assert _statuses(raw) == [401], raw[:300]


# -- B: decoded pixels are capped before decoding -------------------------------------------------

def test_images_over_the_pixel_caps_are_refused_before_decoding(make_server, monkeypatch):
    server = make_server()
    assert server.max_image_pixels == 4096 * 4096 and server.max_request_pixels == 4 * 4096 * 4096
    loads = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: (loads.append(self.size), real_load(self))[1])
    bomb = _png_url(Image.new("1", (5000, 5000)))   # a few KiB that decode to 25 M pixels
    assert len(bomb) < 20_000
    status, body = _post(server, _chat(bomb))
    message = body["error"]["message"]
    assert status == 413 and "5000x5000" in message and "--max-image-pixels" in message
    assert loads == []   # refused from the header alone

    small = make_server(max_image_pixels=40 * 40, max_request_pixels=2 * 40 * 40)
    ok = _png_url(Image.new("RGB", (40, 40), "red"))
    assert _post(small, _chat(ok, ok))[0] == 200
    loads.clear()
    status, body = _post(small, _chat(ok, ok, ok))
    assert status == 413 and "--max-request-pixels" in body["error"]["message"] and loads == []


def test_pils_own_decompression_bomb_error_is_a_413(make_server, monkeypatch):
    server = make_server()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)   # PIL refuses above twice this
    status, body = _post(server, _chat(_png_url(Image.new("RGB", (30, 30)))))
    assert status == 413 and "pixels" in body["error"]["message"]


# -- C: slow clients, a bounded pool, a real backlog -----------------------------------------------

def test_idle_clients_time_out_and_a_full_pool_answers_503(make_server):
    assert make_server().httpd.request_queue_size >= 64   # the trainer opens 32 connections at once
    server = make_server(max_connections=2, socket_timeout=0.5)
    idle = [socket.create_connection(_address(server), timeout=READ_TIMEOUT) for _ in range(2)]
    try:
        for s in idle:
            s.sendall(b"GET /hea")   # headers never finished
        time.sleep(0.1)
        tic = time.monotonic()
        raw = _exchange(server, b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        assert _statuses(raw) == [503] and b"Retry-After: 1" in raw and time.monotonic() - tic < 10.0  # at once, not after a timeout; generous for a loaded machine
        for s in idle:   # the server drops them after --socket-timeout
            assert s.recv(100) == b""
        assert time.monotonic() - tic < 15.0  # dropped (0.5 s timeout), not held for ever
    finally:
        for s in idle:
            s.close()
    for _ in range(50):   # the slots come back once the idle connections are closed
        if _statuses(_exchange(server, b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")) == [200]:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the pool never freed its slots")
    assert server.httpd.rejected >= 1


def test_many_concurrent_connections_are_all_answered(make_server):
    server = make_server()
    base = server.url.removesuffix("/v1")
    results = []

    def get():
        try:
            with urllib.request.urlopen(base + "/health", timeout=20) as resp:
                results.append(resp.status)
        except Exception as err:   # noqa: BLE001 - any failure is what the test counts
            results.append(repr(err))

    threads = [threading.Thread(target=get) for _ in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results == [200] * 64


# -- D: every malformed body gets a 400 with a reason ----------------------------------------------

@pytest.mark.parametrize("body, match", [
    (b'{"model": "\xff\xfe"}', "UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, "nested"),
    (b"{", "JSON"),
    (b"[]", "JSON object"),
    ({"top_logprobs": True}, "top_logprobs"),
    ({"logprobs": "yes"}, "logprobs"),
    ({"logprob_token_ids": [True]}, "logprob_token_ids"),
    ({"model": 5}, "model"),
    ({"max_tokens": "1"}, "max_tokens"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 5}}]}]}, "data URL"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64,iVBORw0KGgo="}}]}]}, "readable image"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64,@@@"}}]}]}, "base64"),
])
def test_malformed_bodies_get_a_400_with_the_reason(make_server, body, match):
    server = make_server()
    if isinstance(body, dict):
        body = {"max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]} | body
    status, answer = _post(server, body)
    assert status == 400 and match in answer["error"]["message"], answer


def test_api_keys_are_compared_in_constant_time(make_server, monkeypatch):
    server = make_server(api_key="secret")
    compared = []
    real = serve.hmac.compare_digest
    monkeypatch.setattr(serve.hmac, "compare_digest", lambda a, b: (compared.append(1), real(a, b))[1])
    assert _post(server, _chat(), key="wrong")[0] == 401 and compared
    assert _post(server, _chat(), key="secret")[0] == 200
    raw = _exchange(server, b"GET /v1/models HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer s\xe9cret\r\n"
                    b"Connection: close\r\n\r\n")
    assert _statuses(raw) == [401]


# -- F: a NaN from the served model never reaches a client as a distribution -----------------------

def test_nan_log_probabilities_are_a_server_error_and_a_judge_error(make_server, tiny_vlm, make_requests):
    from reward.judge import JudgeError

    server = make_server()
    server.judge.next_token_log_probs = lambda convs: torch.full((len(convs), 800), float("nan"))
    status, body = _post(server, _chat())
    assert status == 500 and "NaN" in body["error"]["message"]
    judge = OpenAIJudge(server.url, "tiny", retries=1, backoff=0.01,
                        label_token_ids=label_token_id_map(tiny_vlm.tokenizer))
    with pytest.raises(JudgeError, match="failed after 2 attempt.*NaN"):
        judge.score(make_requests()[:1], "yesno")


# -- G: what is reproducible about served scores ----------------------------------------------------

def _served_logprobs(server, payloads, concurrent: bool) -> list[list[float]]:
    out: list = [None] * len(payloads)

    def one(i):
        status, body = _post(server, payloads[i])
        assert status == 200, body
        out[i] = [e["logprob"] for e in body["choices"][0]["logprobs"]["content"][0]["top_logprobs"]]

    if not concurrent:
        for i in range(len(payloads)):
            one(i)
        return out
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(payloads))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return out


def test_served_scores_are_reproducible_as_documented(make_server, tiny_vlm, make_requests, mixed_specs):
    from reward.vlm.chat_wire import to_openai_messages

    judge = TransformersJudge(tiny_vlm)
    convs = judge.conversations(make_requests(mixed_specs), "score")   # prompts of different lengths
    ids = [tiny_vlm.tokenizer.convert_tokens_to_ids(d) for d in "012345"]
    payloads = [{"max_tokens": 1, "logprobs": True, "logprob_token_ids": ids, "messages": to_openai_messages(c)}
                for c in convs]
    with torch.no_grad():
        alone = [[float(x) for x in judge.next_token_log_probs([c])[0, ids]] for c in convs]
    # --max-batch 1: the same bits as the request scored alone, whatever the concurrency and order
    single = make_server(max_batch=1)
    assert _served_logprobs(single, payloads, concurrent=True) == alone
    assert _served_logprobs(single, payloads[::-1], concurrent=True) == alone[::-1]
    # batched: equal up to the documented rounding, and in fact batched (the padding differs)
    sizes = []
    batched = make_server(max_batch=8, batch_wait_ms=500)
    forward = batched.judge.next_token_log_probs
    batched.judge.next_token_log_probs = lambda cs: (sizes.append(len(cs)), forward(cs))[1]
    got = torch.tensor(_served_logprobs(batched, payloads, concurrent=True))
    assert max(sizes) > 1 and torch.allclose(got, torch.tensor(alone), rtol=0, atol=2e-5)
    local = TransformersJudge(tiny_vlm)
    remote = OpenAIJudge(batched.url, "tiny", concurrency=4, label_token_ids=label_token_id_map(tiny_vlm.tokenizer))
    reqs = make_requests(mixed_specs)
    with torch.no_grad():
        unbatched = torch.cat([local.score([r], "score") for r in reqs])
    assert torch.allclose(remote.score(reqs, "score"), unbatched, rtol=0, atol=2e-6)


# -- H: start-up failures are one line and exit status 2, before the model loads ------------------

def _never_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the check")


def test_missing_model_directory_fails_before_loading(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(serve, "TransformersJudge", _never_load)
    with pytest.raises(SystemExit) as exc:
        serve.main(["--model", str(tmp_path / "missing"), "--port", "0"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "model directory not found" in err


def test_busy_port_fails_before_loading(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(serve, "TransformersJudge", _never_load)
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        with pytest.raises(SystemExit) as exc:
            serve.main(["--model", str(tmp_path), "--port", str(port)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and f"cannot listen on 127.0.0.1:{port}" in err


def test_command_line_failure_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "reward.serve", "--model", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "not found" in proc.stderr
