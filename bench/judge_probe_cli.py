"""The command line the judge probes share (bench/judge_agreement.py, bench/judge_gradients.py):
a run config, how many of its training steps' batches to probe, and --set overrides."""
from __future__ import annotations

import argparse


def probe_config(doc: str, config_help: str, steps: int, steps_help: str, argv: list[str] | None):
    """(steps, RunConfig) from `--config FILE --steps N [--set KEY=VALUE ...]`; torch seeded by train.seed."""
    import torch

    from rl.plumbing.config import load_config

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help=config_help)
    p.add_argument("--steps", type=int, default=steps, help=steps_help)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    torch.manual_seed(cfg.train.seed)
    return args.steps, cfg
