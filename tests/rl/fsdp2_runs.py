"""The multi-process runs of tests/rl/test_fsdp2.py, in one torchrun launch (the processes start once).

    torchrun --standalone --nproc_per_node=2 tests/rl/fsdp2_runs.py PLAN.json

PLAN.json: {"root": DIR, "runs": [{"out": NAME, "overrides": [...], "resume": bool, "copy_to": NAME}]}.
Each run is `rl.train.run` in DIR/NAME, a new run or (resume) a continued one; `copy_to` copies the
finished run directory (rank 0) before the next run starts.
"""
import json
import os
import shutil
import sys
from pathlib import Path

import torch

import rl.train
from rl.plumbing.config import load_config
from rl.plumbing.distributed import init_distributed, shutdown


def main(plan_file: str) -> None:
    plan = json.loads(Path(plan_file).read_text())
    root = Path(plan["root"])
    ctx = init_distributed("cpu")
    for run in plan["runs"]:
        out = root / run["out"]
        cfg = load_config(None, run["overrides"])
        torch.manual_seed(0)  # the same LoRA initialisation as the test's 1-process run
        if run.get("resume"):
            rl.train.run(cfg, resume=out, ctx=ctx)
        else:
            rl.train.run(cfg, out_dir=out, ctx=ctx)
        if run.get("copy_to") and ctx.is_main:
            shutil.copytree(out, root / run["copy_to"])
        ctx.barrier()
    shutdown(ctx)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo can abort at interpreter exit (as rl.train's main)


if __name__ == "__main__":
    main(sys.argv[1])
