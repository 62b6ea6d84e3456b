"""FSDP2 (dist.strategy=fsdp2): two processes (torchrun, gloo, CPU) against one.

- the 2-process FSDP2 update equals the 1-process update on the combined batch (full fine-tune and
  LoRA, with the copies in host memory; float sums round differently: a tolerance);
- save on 2 processes and resume on 2 equals the uninterrupted run bit for bit; the same checkpoint
  resumes on 1 process (DCP reshards) to the same weights within float noise;
- mixed precision (bf16 compute, fp32 shards and reduce) trains in the fp32 update's direction;
- the exported model is the same diffusers directory as a DDP run's and loads; a LoRA run's adapter too;
- config errors name the fix.
FSDP2 runs on CPU with gloo in this torch (fully_shard, reduce-scatter, DCP). CPUOffloadPolicy with
pinned memory, NCCL and bf16 on a GPU are in the CUDA-only test at the end.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rl.train
from core.config.loading import ConfigError
from rl.plumbing.checkpoint import load_checkpoint
from rl.plumbing.config import load_config
from tests.rl.conftest import quick_overrides

ROOT = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("fsdp2_runs.py")
FSDP2 = {"dist.strategy": "fsdp2"}
LORA = {"model.lora.r": 4, "model.lora.alpha": 8, "optim.lr": 1e-3}
MIXED = {"dist.param_dtype": "bfloat16", "dist.reduce_dtype": "float32"}
#: held-out evaluations, sample grids and the final one: under FSDP2 every process takes part in their forwards
EVALS = {"train.eval_per_task": 1, "train.eval_every": 1, "train.sample_every": 1}
#: the other algorithms, one step each (as tests/rl/test_distributed.py runs them under DDP)
ALGORITHMS = {"refl": {"train.algorithm": "refl", "refl.batch_size": 4, "judge.mode": "pairwise"},
              "grpo": {"train.algorithm": "grpo", "sampler.method": "sde", "grpo.kl_coef": 0.04}}


def _torchrun(plan: dict, tmp: Path, nproc: int = 2, timeout: int = 400) -> None:
    (tmp / "plan.json").write_text(json.dumps(plan))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(DRIVER), str(tmp / "plan.json")]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """Every run of the module: the 2-process ones in one torchrun launch, then the 1-process ones here."""
    tmp = tmp_path_factory.mktemp("fsdp2")

    def ov(**extra):
        return quick_overrides(tiny_model_dir, **{"optim.micro_batch": 2, **extra})

    two_steps, one_step = ov(**FSDP2, **EVALS), ov(**FSDP2, **EVALS, **{"train.steps": 1})
    proc = _torchrun({"root": str(tmp), "runs": [
        {"out": "two", "overrides": two_steps},
        {"out": "cut", "overrides": one_step, "copy_to": "cut_for_one"},
        {"out": "cut", "overrides": two_steps, "resume": True},
        {"out": "lora_two", "overrides": ov(**FSDP2, **LORA, **{"train.steps": 1, "dist.copies": "cpu"})},
        {"out": "mixed_two", "overrides": ov(**FSDP2, **MIXED, **{"train.steps": 1})},
        *({"out": f"{name}_two", "overrides": ov(**FSDP2, **extra, **{"train.steps": 1})}
          for name, extra in ALGORITHMS.items()),
    ]}, tmp)
    rl.train.run(load_config(None, ov(**EVALS)), out_dir=tmp / "one")
    for name, extra in ALGORITHMS.items():
        rl.train.run(load_config(None, ov(**extra, **{"train.steps": 1})), out_dir=tmp / f"{name}_one")
    torch.manual_seed(0)  # a LoRA adapter's initialisation draws from the global generator: as in the driver
    rl.train.run(load_config(None, ov(**LORA, **{"train.steps": 1})), out_dir=tmp / "lora_one")
    rl.train.run(load_config(None, two_steps), resume=tmp / "cut_for_one")  # fsdp2 on one process: reshards
    return tmp, proc.stderr


def _assert_same(a: dict, b: dict, copies=("weights", "old", "ema", "ref"), **tol) -> None:
    for copy in copies:
        assert a[copy].keys() == b[copy].keys(), copy
        for name, w in a[copy].items():
            if tol:
                torch.testing.assert_close(b[copy][name], w, **tol, msg=f"{copy}/{name}")
            else:
                assert torch.equal(b[copy][name], w), f"{copy}/{name}"


def _moved(state: dict) -> float:
    return sum(float((w - state["ref"][n]).abs().sum()) for n, w in state["weights"].items())


@pytest.mark.slow  # one torchrun launch of five 2-process runs and three 1-process runs: ~40-60 s on 2 cores
def test_two_fsdp2_processes_match_one(runs):
    tmp, stderr = runs
    one, two = load_checkpoint(tmp / "one"), load_checkpoint(tmp / "two")
    assert one["step"] == two["step"] == 1
    assert "sharded" in two and "sharded" not in one
    assert list((tmp / "two" / "ckpt-000001" / "shards").glob("*.safetensors"))  # each process its own file
    assert not list((tmp / "two").glob("**/*.metadata"))  # no pickled DCP metadata anywhere
    # batched matmuls of 8 vs 2 x 4 samples and sharded reductions round differently: float32 noise
    _assert_same(one, two, rtol=1e-4, atol=1e-6)
    assert _moved(one) > 0
    # the start-up log reports each process's share, the copies' included
    assert "dist.strategy=fsdp2, sharded over 2 processes" in stderr and "copies old + EMA + reference" in stderr


@pytest.mark.slow
def test_evaluations_take_every_process_and_agree(runs):
    """Base, periodic and final held-out evaluations and the sample grids: the same numbers as one process."""
    tmp, _ = runs
    one, two = (json.loads((tmp / r / "summary.json").read_text()) for r in ("one", "two"))
    for key in ("reward_base", "reward_final"):
        assert two[key] == pytest.approx(one[key], abs=1e-4), key
    assert two["ground_truth"].keys() == one["ground_truth"].keys()

    def heldout(run):
        rows = [json.loads(line) for line in (tmp / run / "metrics.jsonl").read_text().splitlines()]
        return [r["heldout/reward"] for r in rows if "heldout/reward" in r]

    assert len(heldout("two")) == 1 and heldout("two") == pytest.approx(heldout("one"), abs=1e-4)
    assert sorted(p.name for p in (tmp / "two" / "samples").iterdir()) == ["step-000000.png", "step-000001.png"]


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_other_algorithms_match_one(runs, algorithm):
    tmp, _ = runs
    one, two = load_checkpoint(tmp / f"{algorithm}_one"), load_checkpoint(tmp / f"{algorithm}_two")
    _assert_same(one, two, rtol=1e-4, atol=1e-6)
    assert _moved(one) > 0


@pytest.mark.slow
def test_lora_with_host_memory_copies_matches_one(runs):
    tmp, _ = runs
    one, two = load_checkpoint(tmp / "lora_one"), load_checkpoint(tmp / "lora_two")
    assert all(".lora_" in name for name in two["weights"])  # the adapter only, as in a DDP checkpoint
    _assert_same(one, two, rtol=1e-4, atol=1e-6)
    assert _moved(one) > 0


@pytest.mark.slow
def test_resume_on_two_is_exact_and_on_one_reshards(runs):
    tmp, _ = runs
    whole = load_checkpoint(tmp / "two")
    _assert_same(whole, load_checkpoint(tmp / "cut"))  # saved after step 0, resumed on 2: bit for bit
    resumed_on_one = load_checkpoint(tmp / "cut_for_one")
    assert resumed_on_one["step"] == 1
    _assert_same(whole, resumed_on_one, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_mixed_precision_trains_near_float32(runs):
    tmp, _ = runs
    full = load_checkpoint(tmp / "one" / "ckpt-000000")
    mixed = load_checkpoint(tmp / "mixed_two")
    for w in mixed["weights"].values():
        assert w.dtype == torch.float32 and torch.isfinite(w).all()  # the shards keep model.dtype
    step_full = torch.cat([(full["weights"][n] - full["ref"][n]).flatten() for n in full["weights"]])
    step_mixed = torch.cat([(mixed["weights"][n] - mixed["ref"][n]).flatten() for n in full["weights"]])
    cos = float(torch.nn.functional.cosine_similarity(step_full, step_mixed, dim=0))
    # bf16 rollouts and gradients change rewards and AdamW's sign-like first step a little (measured: 0.88):
    # the same direction, and not the float32 bits (which would mean the policy was not applied)
    assert 0.6 < cos < 0.999, cos


@pytest.mark.slow
def test_export_writes_what_ddp_writes_and_loads(runs):
    from diffusers import FluxFillPipeline

    from core.policies.flux_fill import FluxFillPolicy

    tmp, _ = runs
    one, two = tmp / "one" / "final", tmp / "two" / "final"
    files = sorted(str(p.relative_to(one)) for p in one.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(two)) for p in two.rglob("*") if p.is_file())
    assert json.loads((two / "transformer" / "config.json").read_text())["_class_name"] == "FluxTransformer2DModel"
    pipe = FluxFillPipeline.from_pretrained(two)
    ema = load_checkpoint(tmp / "two")["ema"]
    for name, p in pipe.transformer.named_parameters():
        assert torch.equal(p.detach(), ema[name]), name
    # LoRA: the adapter in diffusers' format, loaded into a fresh policy of the base model
    policy = FluxFillPolicy.from_pretrained(load_config(str(tmp / "lora_two" / "config.yaml")).model.path)
    policy.load_lora_weights(tmp / "lora_two" / "final")
    lora_ema = load_checkpoint(tmp / "lora_two")["ema"]
    for name, p in policy.trainable_parameters().items():
        assert torch.equal(p.detach(), lora_ema[name]), name


def test_copies_of_a_sharded_model_update_and_swap_in(tmp_path):
    """weight_copies.clone / lerp_ on DTensor shards (device and host memory) and core.policies.policy.swapped_weights
    on a fully_shard-ed model: the forward uses the copy, and the trained weights are back afterwards.
    (Replacing the Parameter objects, the swap for unsharded models, is ignored by FSDP2: the forward
    would silently use the trained weights.)"""
    import socket

    import torch.multiprocessing as mp

    from tests.rl.fsdp2_swap_worker import work

    with socket.socket() as probe:  # a port free now (one derived from the pid collided once in a full run)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(work, args=(2, port, str(tmp_path / "out")), nprocs=2)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"out.{rank}").read_text())
        for where in ("device", "cpu"):
            swapped, restored = got[where]
            assert swapped < 1e-6 and restored < 1e-6, (rank, where, got)
        assert got["type"] == "DTensor" and got["shard_device"] == "cpu" and got["bytes"] > 0


@pytest.mark.parametrize("override, message", [
    (["dist.param_dtype=bfloat16"], "dist.param_dtype=bfloat16 only applies to sharded training: set dist.strategy"),
    (["dist.cpu_offload=true", "dist.copies=cpu"], "dist.cpu_offload=true, dist.copies=cpu only applies"),
    (["dist.strategy=fsdp2", "monitor.every=5"], "monitor.every is not supported with dist.strategy=fsdp2"),
    (["dist.strategy=fsdp3"], "dist.strategy: 'fsdp3' is not one of"),
])
def test_config_errors_name_the_fix(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, override)
    assert message in str(err.value)


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_gpus_nccl_offload_and_bf16(tiny_model_dir, tmp_path):
    """NCCL, CPUOffloadPolicy (pinned host memory), copies in host memory and bf16 compute on two GPUs:
    trains, checkpoints, resumes bit for bit on two processes and exports."""
    ov = quick_overrides(tiny_model_dir, **{**FSDP2, **MIXED, "model.device": "cuda", "optim.micro_batch": 2,
                                            "dist.cpu_offload": "true", "dist.copies": "cpu"})
    cut = ov + ["train.steps=1"]
    _torchrun({"root": str(tmp_path), "runs": [
        {"out": "two", "overrides": ov}, {"out": "cut", "overrides": cut},
        {"out": "cut", "overrides": ov, "resume": True}]}, tmp_path)
    whole = load_checkpoint(tmp_path / "two")
    _assert_same(whole, load_checkpoint(tmp_path / "cut"))
    assert _moved(whole) > 0 and (tmp_path / "two" / "final" / "transformer").is_dir()
