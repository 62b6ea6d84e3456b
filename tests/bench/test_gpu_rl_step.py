"""bench/gpu_rl_step.py on a CPU: the tiny dry run end to end, and the per-phase peak bookkeeping
against a fake CUDA allocator (the real one needs a GPU: bench/gpu_check.sh runs it there)."""
import json

import pytest
import torch

from bench import gpu_rl_step


def test_tiny_cpu_dry_run_plans_trains_and_reports(tmp_path):
    out, work = tmp_path / "r.json", tmp_path / "work"
    assert gpu_rl_step.main(["--device", "cpu", "--tiny", "--workdir", str(work), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["kind"] == "gpu_rl_step" and report["device"]["kind"] == "cpu"
    assert set(report["versions"]) >= {"torch", "triton", "diffusers", "transformers", "peft", "date"}
    overrides = report["config"]["overrides"]
    assert "judge.kind=rule" in overrides and "train.steps=2" in overrides
    # the plan's static rows are the loaded policy's and the trainer's, parameter for parameter, byte for byte
    static = {r["row"]: r for r in report["static"]}
    assert set(static) == {"transformer", "text encoder", "text encoder 2", "VAE", "trainable", "copies", "AdamW"}
    for row in static.values():
        assert (row["plan_params"], row["plan_bytes"]) == (row["measured_params"], row["measured_bytes"]), row
    assert static["transformer"]["measured_params"] == report["model"]["params"]["transformer"]
    plan = report["plan"]
    assert plan["consistent"] and plan["total_bytes"] == plan["static_bytes"] + plan["step_bytes"] + plan["runtime_bytes"]
    # two steps, each with a backward (the group filter is off), and the split of the second
    steps = report["time"]["steps"]
    assert [s["step"] for s in steps] == [0, 1] and not any(s["skipped"] for s in steps)
    assert all(s[k] > 0 for s in steps for k in ("time_rollout", "time_judge", "time_update"))
    assert report["time"]["median"]["update_s"] == steps[1]["time_update"]
    assert abs(sum(report["time"]["share"].values()) - 1) < 1e-9
    # no allocator peak on a CPU: said, not faked; the phases were still entered
    memory = report["memory"]
    assert memory["measured"] is None and "no CUDA device" in memory["skipped"]
    assert {name: p["calls"] for name, p in memory["phases"].items()} == {
        "build": 1, "rollout": 2, "encode": 2, "decode": 2, "judge": 4, "update": 2}
    assert not (work / "model").exists() and not (work / "run").exists()  # cleaned up without --keep


class FakeAllocator:
    """torch.cuda's allocator counters: current and peak bytes; reserved = allocated + 10."""

    def __init__(self):
        self.now = self.peak = 0

    def alloc(self, n):
        self.now += n
        self.peak = max(self.peak, self.now)

    def free(self, n):
        self.now -= n

    def install(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: self.peak)
        monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: self.peak + 10)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: self.now)
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: setattr(self, "peak", self.now))
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)


def test_peak_tracker_credits_each_segment_to_every_open_phase(monkeypatch):
    fake = FakeAllocator()
    fake.install(monkeypatch)
    tracker = gpu_rl_step.PeakTracker(torch.device("cuda"))
    tracker.start()
    fake.alloc(100)                       # weights: outside every phase
    with tracker.phase("rollout"):
        fake.alloc(50)
        with tracker.phase("decode"):     # nested: its peak is also the rollout's
            fake.alloc(300)
            fake.free(300)
        fake.free(50)
    fake.alloc(20)                        # between phases
    with tracker.phase("update"):
        fake.alloc(200)
        fake.free(200)
    tracker.finish()
    phases = tracker.report()
    assert tracker.peak_allocated == 450 and tracker.peak_reserved == 460
    assert tracker.outside_phases == 120
    assert phases["rollout"] == {"calls": 1, "peak_allocated": 450, "peak_reserved": 460, "growth": 350,
                                 "start_allocated_max": 100}
    assert phases["decode"]["growth"] == 300 and phases["decode"]["start_allocated_max"] == 150
    assert phases["update"]["peak_allocated"] == 320 and phases["update"]["growth"] == 200


def test_image_size_must_suit_the_synthetic_world():
    with pytest.raises(SystemExit):
        gpu_rl_step.parse_args(["--device", "cpu", "--image-size", "40"])
    assert gpu_rl_step.parse_args(["--device", "cpu"]).double == 4
    assert gpu_rl_step.parse_args(["--device", "cpu", "--tiny", "--double", "2"]).double == 2
