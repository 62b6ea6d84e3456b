"""`python -m rl.plan`: will a run config fit on the GPUs? A memory plan before launch.

    python -m rl.plan --config FILE [--gpus N] [--gpu-memory GB] [--set KEY=VALUE ...]

Builds the policy (and an in-process judge) from their config files on the meta device: no
weights, no GPU, no download. Prints per GPU the parameters of each part (transformer, text
encoders, VAE, judge), the trainable parameters (full fine-tune or LoRA), the trainer's three
weight copies (old, EMA, reference), AdamW's state, gradients, the activations of one
micro-batch, the total against the GPU memory and a verdict; when it does not fit, what to change,
each change re-planned. DDP (torchrun) replicates all of it on every GPU; with dist.strategy=fsdp2
the transformer, the trainable weights, their copies, AdamW state and gradients are divided over the
GPUs (plus the weights gathered for compute). Model architectures come
from a local directory, the Hugging Face cache, or rl/planning/known_models.py.

Exit status: 0 when the plan fits (or is tight), 1 when it does not fit, 2 on a config error.
"""
from __future__ import annotations

import sys

from core.config.loading import ConfigError


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module docstring); returns the exit status."""
    from core.config.cli import config_parser
    from rl.planning.advice import advise
    from rl.planning.architectures import PlanError
    from rl.planning.loading import load_for_plan
    from rl.planning.memory_plan import make_plan
    from rl.planning.report import render
    from rl.plumbing.config import RunConfig
    from rl.plumbing.config_checks import NUMERIC_RANGES

    parser = config_parser("python -m rl.plan", __doc__, RunConfig, ranges=NUMERIC_RANGES,
                           example="optim.micro_batch=1",
                           config_help="YAML run config, as for rl.train (default: the built-in tiny NFT job)")
    parser.add_argument("--gpus", type=int, default=1, metavar="N",
                        help="GPUs (torchrun processes) the run will use (default: 1)")
    parser.add_argument("--gpu-memory", type=float, default=80.0, metavar="GB",
                        help="memory of each GPU in GiB, e.g. 80 for an 80 GB A100 / H100 (default: 80)")
    args = parser.parse_args(argv)
    if args.gpus < 1 or args.gpu_memory <= 0:
        parser.error("--gpus must be >= 1 and --gpu-memory > 0")
    try:
        cfg, issues = load_for_plan(args.config, args.overrides)
        plan = make_plan(cfg, args.gpus, args.gpu_memory)
        plan.warnings[:0] = issues
        plan.advice = advise(cfg, plan)
    except (ConfigError, PlanError, FileNotFoundError) as err:
        print(f"[rl.plan] {err}", file=sys.stderr)
        return 2
    print(render(plan, title=args.config or "the built-in default"))
    return 1 if plan.verdict == "does not fit" else 0


if __name__ == "__main__":
    sys.exit(main())
