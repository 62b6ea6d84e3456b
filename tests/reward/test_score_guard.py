"""Every backend's last line, `check_scores`: NaN, out-of-range and wrong-length scores end in a
JudgeError, never in a reward. Each test breaks a backend's raw scoring, not the guard itself, so it
fails if a backend stops calling the guard."""
import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from core.synthetic.world import SyntheticWorld
from reward.judge import JudgeError, JudgeRequest, check_scores
from reward.judges.api_judge import OpenAIJudge
from reward.judges.rule_judge import RuleJudge
from reward.judges.vlm_judge import TransformersJudge

NAN = float("nan")


def test_check_scores_itself():
    assert torch.equal(check_scores(torch.tensor([0.0, 1.0]), 2, "j"), torch.tensor([0.0, 1.0]))
    for bad, n, match in [([NAN], 1, "non-finite"), ([math.inf], 1, "non-finite"), ([1.01], 1, "outside"),
                          ([-1e-6], 1, "outside"), ([0.5, 0.5], 1, r"\(2,\) scores for 1"), ([], 1, "for 1")]:
        with pytest.raises(JudgeError, match=match):
            check_scores(torch.tensor(bad), n, "j")


# (what the broken raw scoring returns for n requests, what the error says)
BROKEN_PROBS = [
    (lambda n: torch.full((n, 2), NAN), "non-finite"),
    (lambda n: torch.tensor([[1.5, -0.5]] * n), "outside"),
    (lambda n: torch.tensor([[0.5, 0.5]] * (n + 1)), "scores for"),
]


@pytest.fixture(scope="module")
def world_requests():
    s = SyntheticWorld(seed=3).sample("fill", 0)
    return [JudgeRequest("fill", d, s.source, s.target, s.mask, s.prompt, truth=s, other=s.source)
            for d in ("structure", "consistency")]


@pytest.mark.parametrize("mode", ["score", "yesno", "pairwise"])
def test_rule_judge_nan_quality_is_a_judge_error(world_requests, monkeypatch, mode):
    judge = RuleJudge()
    assert judge.score(world_requests, mode).shape == (2,)
    monkeypatch.setattr(judge, "quality", lambda *a: torch.tensor(NAN, dtype=torch.float64))
    with pytest.raises(JudgeError, match="RuleJudge.*non-finite"):
        judge.score(world_requests, mode)


@pytest.mark.parametrize("raw, match", [(torch.tensor([0.5, NAN]), "non-finite"),
                                        (torch.tensor([0.5, 1.5]), "outside"),
                                        (torch.tensor([0.5, -0.1]), "outside"),
                                        (torch.tensor([0.5]), r"\(1,\) scores for 2")])
def test_rule_judge_bad_raw_scores_are_judge_errors(world_requests, monkeypatch, raw, match):
    judge = RuleJudge()
    monkeypatch.setattr(judge, "_raw_scores", lambda requests, mode: raw)
    with pytest.raises(JudgeError, match=f"RuleJudge.*{match}"):
        judge.score(world_requests, "score")


@pytest.mark.parametrize("broken, match", BROKEN_PROBS)
def test_transformers_judge_bad_label_probs_are_judge_errors(tiny_vlm, make_requests, monkeypatch, broken, match):
    judge = TransformersJudge(tiny_vlm)
    reqs = make_requests()[:2]
    monkeypatch.setattr(judge, "label_probs", lambda convs, mode: broken(len(convs)))
    with pytest.raises(JudgeError, match=f"TransformersJudge.*{match}"):
        judge.score(reqs, "yesno")


def test_transformers_judge_nan_logits_are_a_judge_error(tiny_vlm, make_requests, monkeypatch):
    judge = TransformersJudge(tiny_vlm)
    monkeypatch.setattr(judge, "next_token_logits", lambda convs: torch.full((len(convs), 800), NAN))
    for mode in ("score", "yesno", "pairwise"):
        with pytest.raises(JudgeError, match="non-finite"):
            judge.score(make_requests()[:2], mode)


class _YesServer:
    """Answers every chat completion with P(Yes) = 0.7: the API judge itself is what breaks."""

    def __init__(self):
        entries = [{"token": "Yes", "logprob": math.log(0.7)}, {"token": "No", "logprob": math.log(0.3)}]
        data = json.dumps({"choices": [{"logprobs": {"content": [{**entries[0], "top_logprobs": entries}]}}]}).encode()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers["Content-Length"]))
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"


@pytest.fixture(scope="module")
def yes_server():
    server = _YesServer()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


@pytest.mark.parametrize("broken, match", BROKEN_PROBS)
def test_api_judge_bad_label_probs_are_judge_errors(yes_server, make_requests, monkeypatch, broken, match):
    judge = OpenAIJudge(yes_server.url, "judge", retries=0)
    reqs = make_requests()[:2]
    assert torch.allclose(judge.score(reqs, "yesno"), torch.tensor([0.7, 0.7]), atol=1e-6)
    monkeypatch.setattr(judge, "label_probs", lambda convs, mode: broken(len(convs)))
    with pytest.raises(JudgeError, match=f"OpenAIJudge.*{match}"):
        judge.score(reqs, "yesno")


def test_api_judge_nan_label_log_probs_are_a_judge_error(yes_server, make_requests, monkeypatch):
    judge = OpenAIJudge(yes_server.url, "judge", retries=0)
    monkeypatch.setattr(judge, "_label_log_probs", lambda conv, mode: ([NAN] * (6 if mode == "score" else 2), 0))
    for mode in ("score", "yesno"):
        with pytest.raises(JudgeError, match="OpenAIJudge.*non-finite"):
            judge.score(make_requests()[:2], mode)
