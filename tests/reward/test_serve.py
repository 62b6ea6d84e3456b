"""`reward.serve` on loopback with the tiny judge: the API judge must score like the in-process one."""
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import torch

from reward.judge import JudgeError
from reward.judges.api_judge import OpenAIJudge
from reward.judges.vlm_judge import TransformersJudge
from reward.serve import JudgeServer
from reward.vlm.labels import label_token_id_map


@pytest.fixture
def served(tiny_vlm):
    server = JudgeServer(TransformersJudge(tiny_vlm, batch_size=16), port=0, model_name="tiny", max_batch=16,
                         batch_wait_ms=20, max_logprobs=1000, api_key="secret").start()
    yield server
    server.close()


@pytest.mark.parametrize("view", [dict(), dict(show_crop=True, crop_size=28, show_source=False)])
def test_api_scores_equal_in_process_scores(tiny_vlm, served, make_requests, view):
    reqs = make_requests()
    local = TransformersJudge(tiny_vlm, both_orders=True, **view)
    remote = OpenAIJudge(served.url, "tiny", api_key="secret", concurrency=8, both_orders=True,
                         label_token_ids=label_token_id_map(tiny_vlm.tokenizer), **view)
    # crops are cut and resized by the client, so they cross the wire rounded to 8 bits
    atol = 1e-3 if view.get("show_crop") else 1e-5
    for mode in ("score", "yesno", "pairwise"):
        with torch.no_grad():
            expected = local.score(reqs, mode)
        assert torch.allclose(remote.score(reqs, mode), expected, atol=atol), mode
    # without logprob_token_ids the labels come from the top-k list: all of them when k covers the vocabulary
    top_k = OpenAIJudge(served.url, "tiny", api_key="secret", top_logprobs=len(tiny_vlm.tokenizer), **view)
    with torch.no_grad():
        expected = local.score(reqs, "yesno")
    assert torch.allclose(top_k.score(reqs, "yesno"), expected, atol=atol)
    assert top_k.ping() == ["tiny"]


def test_concurrent_requests_share_a_forward(tiny_vlm, make_requests):
    judge = TransformersJudge(tiny_vlm, batch_size=16)
    sizes = []
    forward = judge.next_token_log_probs
    judge.next_token_log_probs = lambda convs: (sizes.append(len(convs)), forward(convs))[1]
    with JudgeServer(judge, port=0, batch_wait_ms=300, max_batch=16) as server:
        remote = OpenAIJudge(server.url, "judge", concurrency=8, label_token_ids=label_token_id_map(tiny_vlm.tokenizer))
        remote.score(make_requests() * 2, "score")
    assert sum(sizes) == 8 and max(sizes) > 1


def _post(url, body, key=None):
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_auth_routes_and_bad_requests(tiny_vlm, served, make_requests):
    JudgeServer(TransformersJudge(tiny_vlm), port=0).close()   # closing a server that never served returns
    base = served.url.removesuffix("/v1")
    with urllib.request.urlopen(base + "/health", timeout=10) as resp:
        assert json.loads(resp.read()) == {"status": "ok"}
    url = served.url + "/chat/completions"
    ok = {"model": "tiny", "max_tokens": 1, "logprobs": True, "top_logprobs": 3,
          "messages": [{"role": "user", "content": "Is it fine? Reply Yes or No."}]}
    status, body = _post(url, ok, key="secret")
    assert status == 200 and len(body["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 3
    assert _post(url, ok)[0] == 401 and _post(url, ok, key="wrong")[0] == 401
    for bad, match in [({"max_tokens": 5}, "max_tokens"), ({"top_logprobs": 5000}, "max-logprobs"),
                       ({"model": "other"}, "not served"),
                       ({"messages": [{"role": "user", "content": [
                           {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}]}, "data URL"),
                       ({"logprob_token_ids": [10**9]}, "logprob_token_ids")]:
        status, body = _post(url, ok | bad, key="secret")
        assert status == 400 and match in body["error"]["message"], bad
    # the client reports a 400 at once, with the server's reason
    judge = OpenAIJudge(served.url, "nope", api_key="secret", retries=3, backoff=0.01)
    with pytest.raises(JudgeError, match="HTTP 400.*not served"):
        judge.score(make_requests()[:1], "yesno")
    assert judge.attempts == 1


def test_command_line_server(tiny_vlm, tmp_path, make_requests):
    tiny_vlm.save_pretrained(tmp_path / "judge")
    env = dict(os.environ, JUDGE_KEY="k2")
    proc = subprocess.Popen([sys.executable, "-m", "reward.serve", "--model", str(tmp_path / "judge"), "--port", "0",
                             "--served-model-name", "tiny", "--api-key-env", "JUDGE_KEY", "--dtype", "float32"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = []
        while not lines or ("served at" not in lines[-1] and lines[-1]):
            lines.append(proc.stdout.readline())   # loading progress comes first
        line = lines[-1]
        assert "served at http://127.0.0.1:" in line, "".join(lines)
        url = line.split("served at ")[1].split()[0]
        remote = OpenAIJudge(url, "tiny", api_key="k2", label_token_ids=label_token_id_map(tiny_vlm.tokenizer))
        reqs = make_requests()[:2]
        with torch.no_grad():
            expected = TransformersJudge(tiny_vlm).score(reqs, "yesno")
        assert torch.allclose(remote.score(reqs, "yesno"), expected, atol=1e-5)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
