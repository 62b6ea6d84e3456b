"""judge.overlap and sampler.rollout_chunk (rl/algorithms/judge_pipeline.py): the rollout in chunks, each
judged in a background thread while the next is generated, gives the step the synchronous path gives
(rule judge, and a served judge on two endpoints); judge failures stop the step as themselves; the keys
are checked."""
import hashlib
import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import rl.train
from core.config.loading import ConfigError
from reward.judge import Judge, JudgeError, check_scores
from rl.algorithms.judge_pipeline import ChunkJudging, rollout_chunks
from rl.plumbing.checkpoint import load_checkpoint
from rl.plumbing.config import load_config
from rl.plumbing.distributed import DistContext, init_distributed
from rl.plumbing.run_dir import check_resume_config

ALGORITHMS = {"nft": {}, "grpo": {"train.algorithm": "grpo", "sampler.method": "sde"},
              "awm": {"train.algorithm": "awm", "sampler.method": "sde"}}


def _trainer(quick, **extra):
    torch.manual_seed(0)
    cfg = load_config(None, quick(**extra))
    return rl.train.make_trainer(cfg, init_distributed("cpu"))


def _steps(trainer, n=2):
    return [trainer.train_step(step) for step in range(n)]


def _same_weights(a, b) -> bool:
    return all(torch.equal(a.params[k].detach(), b.params[k].detach()) and torch.equal(a.old[k], b.old[k])
               and torch.equal(a.ema[k], b.ema[k]) for k in a.params)


def _overlap_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "judge-overlap"]


def _no_overlap_thread_left():
    for _ in range(100):
        if not _overlap_threads():
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("algorithm", [*ALGORITHMS, "nft_pairwise"])
def test_overlap_gives_the_synchronous_steps(quick, algorithm):
    """Same seeds, deterministic (rule) judge: the overlapped steps equal the synchronous ones bit for bit
    (weights, sampling policy, EMA, rewards), with 8 images in chunks of 3 (3, 3, 2)."""
    # nft_pairwise: each image judged against its condition's anchor, which travels with the chunk
    settings = {"judge.mode": "pairwise"} if algorithm == "nft_pairwise" else ALGORITHMS[algorithm]
    extra = {**settings, "sampler.rollout_chunk": 3}
    sync = _trainer(quick, **extra)
    overlap = _trainer(quick, **extra, **{"judge.overlap": True})
    m_sync, m_overlap = _steps(sync), _steps(overlap)
    assert _same_weights(sync, overlap)
    for a, b in zip(m_sync, m_overlap):
        assert (a["reward"], a["reward_by_task_dim"], a["loss"]) == (b["reward"], b["reward_by_task_dim"], b["loss"])
        assert b["judge_busy_s"] > 0 and not b["skipped"]
    assert _no_overlap_thread_left()


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_chunks_are_judge_calls_and_keep_the_images(quick, monkeypatch, algorithm):
    """rollout_chunk splits the rollout into that many images per generation and per judge call, in
    order; the chunks' images are those of the whole-share rollout (the SDE noise too: each chunk
    keeps its rows of the share's draw), up to float rounding of other batch shapes."""
    whole = _trainer(quick, **ALGORITHMS[algorithm])
    chunked = _trainer(quick, **ALGORITHMS[algorithm], **{"sampler.rollout_chunk": 3, "judge.overlap": True})
    calls = []
    real = chunked.judge.score
    monkeypatch.setattr(chunked.judge, "score", lambda requests, mode="score": calls.append(
        [r.edited for r in requests]) or real(requests, mode))
    a, b = whole.rollout(0), chunked.rollout(0)
    b.judging.result()
    a.judging.close()
    torch.testing.assert_close(b.images, a.images, rtol=0, atol=1e-5)
    # the images of each judge call (a request per dimension: the same image several times)
    judged = [list({e.data_ptr(): e for e in call}.values()) for call in calls]
    assert [len(j) for j in judged] == [3, 3, 2]
    assert torch.equal(torch.stack([e for j in judged for e in j]), b.images)   # chunk order = rollout order
    if algorithm == "grpo":   # the recorded SDE steps and their log-probabilities too
        torch.testing.assert_close(b.traj.x_next, a.traj.x_next, rtol=0, atol=1e-5)
        torch.testing.assert_close(b.traj.logp, a.traj.logp, rtol=1e-4, atol=1e-4)
        # as the second of two processes (rows 4..7 of the step): its chunks keep their rows of the step's draw
        chunked.ctx = DistContext(1, 2, torch.device("cpu"))
        second = chunked.rollout(0)
        second.judging.close()
        torch.testing.assert_close(second.images, a.images[4:], rtol=0, atol=1e-5)
    assert rollout_chunks(8, 0) == [slice(0, 8)] and rollout_chunks(8, 3) == [slice(0, 3), slice(3, 6), slice(6, 8)]


class _FailingJudge(Judge):
    """Scores like a constant judge, but its call number `fail_at` raises (a judge that died)."""

    def __init__(self, fail_at: int, delay: float = 0.0):
        self.fail_at, self.delay, self.calls = fail_at, delay, 0

    def score(self, requests, mode="score"):
        self.calls += 1
        time.sleep(self.delay)
        if self.calls == self.fail_at:
            raise JudgeError(f"judge server http://judge-{self.calls}/v1 failed after 3 attempt(s)")
        return check_scores(torch.full((len(requests),), 0.5), len(requests), "FailingJudge")


def test_a_judge_failure_stops_the_step_as_itself(quick, tmp_path, monkeypatch):
    # in the trainer: the worker's JudgeError is raised on the training thread, as itself
    trainer = _trainer(quick, **{"sampler.rollout_chunk": 2, "judge.overlap": True})
    trainer.judge = _FailingJudge(fail_at=2)
    with pytest.raises(JudgeError, match=r"http://judge-2/v1 failed after 3 attempt"):
        trainer.train_step(0)
    assert _no_overlap_thread_left()
    # a failure surfaces at the next chunk, not after the whole rollout: the rest is not generated
    trainer.judge = _FailingJudge(fail_at=1)
    made = []

    def make(c):
        made.append(c)
        while c.start and trainer.judge.calls < 1:   # chunk 0 is being judged (and fails) meanwhile
            time.sleep(0.01)
        time.sleep(0.1)
        return None, torch.zeros(c.stop - c.start, 3, 64, 64)

    with pytest.raises(JudgeError, match="judge-1"):
        trainer.judged_rollout(0, trainer.data.conditions(0, 0, 8), 8, make)
    assert len(made) == 2 and _no_overlap_thread_left()
    # a failure of the rollout itself ends the judge's thread too
    trainer.judge = _FailingJudge(fail_at=0, delay=0.2)

    def broken(c):
        if c.start:
            raise RuntimeError("CUDA out of memory")
        return None, torch.zeros(c.stop - c.start, 3, 64, 64)

    with pytest.raises(RuntimeError, match="out of memory"):
        trainer.judged_rollout(0, trainer.data.conditions(0, 0, 8), 8, broken)
    assert _no_overlap_thread_left()
    # in a run: the step stops loudly (never a zero reward), nothing trained is lost
    cfg = load_config(None, quick(**{"sampler.rollout_chunk": 4, "judge.overlap": True}))
    original = rl.train.make_trainer

    def failing_trainer(cfg, ctx):
        t = original(cfg, ctx)
        t.judge = _FailingJudge(fail_at=4)   # step 0: calls 1, 2; step 1: calls 3, 4
        return t

    monkeypatch.setattr(rl.train, "make_trainer", failing_trainer)
    with pytest.raises(rl.train.RunStopped, match=r"step 1 failed: judge server http://judge-4/v1") as err:
        rl.train.run(cfg, out_dir=tmp_path)
    assert isinstance(err.value.__cause__, JudgeError) and load_checkpoint(tmp_path)["step"] == 0


def test_chunk_judging_unit():
    """Scores in chunk order whatever each chunk's judging time; floored shares weighted by requests."""
    from rl.plumbing.data import WorldData

    class Slow(Judge):
        last_floored_share = None

        def __init__(self):
            self.sizes = []

        def score(self, requests, mode="score"):
            self.sizes.append(len(requests))
            time.sleep(0.1 if len(self.sizes) == 1 else 0.0)   # the first chunk is the slow one
            self.last_floored_share = len(requests) / 100
            return torch.tensor([float(r.edited.mean()) for r in requests])

    samples = WorldData({"removal": 1.0}, image_size=32).conditions(0, 0, 6)
    images = torch.rand(6, 3, 32, 32)
    judge = Slow()
    judging = ChunkJudging(judge, "score", overlap=True)
    for c in rollout_chunks(6, 4):
        judging.submit(samples[c], images[c])
    table, floored, busy = judging.result()
    torch.testing.assert_close(table.per_image, images.mean((1, 2, 3)))
    assert len(judge.sizes) == 2 and busy >= 0.1
    assert floored == pytest.approx(sum(k * k / 100 for k in judge.sizes) / sum(judge.sizes))
    with pytest.raises(RuntimeError, match="after result"):
        judging.submit(samples, images)
    assert _no_overlap_thread_left()


class _FakeOpenAI:
    """An OpenAI-compatible judge server whose answer is a function of the request's content (so equal
    requests get equal scores whichever endpoint answers) after a content-dependent delay."""

    def __init__(self):
        self.requests = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, body):
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802
                self._send({"data": [{"id": "fake"}]})

            def do_POST(self):  # noqa: N802
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests += 1
                digest = hashlib.sha256(json.dumps(payload["messages"]).encode()).digest()
                time.sleep(0.001 * (digest[0] % 8))
                weights = [1 + b for b in digest[1:7]]
                entries = [{"token": str(d), "logprob": math.log(w / sum(weights))} for d, w in enumerate(weights)]
                best = max(entries, key=lambda e: e["logprob"])
                self._send({"choices": [{"index": 0, "message": {"role": "assistant", "content": best["token"]},
                                         "logprobs": {"content": [{**best, "top_logprobs": entries}]}}]})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_overlap_with_a_served_judge_on_two_endpoints(quick, tmp_path):
    """rl.train end to end, judge.base_url a list of two servers: overlap and sync train the same weights."""
    servers = [_FakeOpenAI(), _FakeOpenAI()]
    try:
        urls = "[" + ",".join(s.url for s in servers) + "]"
        runs = {}
        for overlap in (False, True):
            cfg = load_config(None, quick(**{
                "judge.kind": "openai", "judge.base_url": urls, "judge.model": "fake", "judge.concurrency": 2,
                "sampler.rollout_chunk": 3, "judge.overlap": overlap}))
            assert cfg.judge.base_url == [s.url for s in servers]
            rl.train.run(cfg, out_dir=tmp_path / str(overlap))
            runs[overlap] = load_checkpoint(tmp_path / str(overlap))
            lines = [json.loads(x) for x in (tmp_path / str(overlap) / "metrics.jsonl").read_text().splitlines()]
            runs[overlap]["rewards"] = [m["reward"] for m in lines]
        for key in ("weights", "old", "ema"):
            assert all(torch.equal(runs[False][key][k], runs[True][key][k]) for k in runs[False][key]), key
        assert runs[False]["rewards"] == runs[True]["rewards"]
        assert min(s.requests for s in servers) > 0   # both endpoints judged
    finally:
        for s in servers:
            s.close()


def test_the_keys_are_checked():
    nft = ["train.algorithm=nft", "judge.mode=score"]  # the default job is ReFL
    with pytest.raises(ConfigError, match="judge.overlap .* sampler.rollout_chunk is 0"):
        load_config(None, nft + ["judge.overlap=true"])
    with pytest.raises(ConfigError, match="rollout-based algorithms"):
        load_config(None, ["train.algorithm=refl", "judge.mode=pairwise", "sampler.rollout_chunk=2"])
    with pytest.raises(ConfigError, match=r"sampler.rollout_chunk must be in \[0, inf\)"):
        load_config(None, ["sampler.rollout_chunk=-1"])
    base = ["judge.kind=openai", "judge.model=m"]
    cfg = load_config(None, base + ["judge.base_url=[http://a:8000/v1, http://b:8000/v1]"])
    assert cfg.judge.base_url == ["http://a:8000/v1", "http://b:8000/v1"]
    assert load_config(None, base + ["judge.base_url=http://a:8000/v1"]).judge.base_url == "http://a:8000/v1"
    with pytest.raises(ConfigError, match=r"'http://a:8000/v1,http://b:8000/v1' is not an http\(s\) URL"):
        load_config(None, base + ["judge.base_url=http://a:8000/v1,http://b:8000/v1"])
    with pytest.raises(ConfigError, match="names a server twice"):
        load_config(None, base + ["judge.base_url=[http://a:8000/v1, http://a:8000/v1/]"])
    with pytest.raises(ConfigError, match="monitor.judge.overlap is not used"):
        load_config(None, ["monitor.every=1", "monitor.signal=judge", "monitor.judge.kind=rule",
                           "monitor.judge.overlap=true"])
    # overlap changes when the judge works, not the results: a resume may switch it; the chunk size not
    stored = load_config(None, nft + ["sampler.rollout_chunk=4"])
    check_resume_config(stored, load_config(None, nft + ["sampler.rollout_chunk=4", "judge.overlap=true"]))
    with pytest.raises(ConfigError, match="sampler.rollout_chunk"):
        check_resume_config(stored, load_config(None, nft + ["sampler.rollout_chunk=2"]))
