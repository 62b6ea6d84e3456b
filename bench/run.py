"""Benchmarks: `python bench/run.py [--quick] [--only kernels] [--out FILE]`.

Sections (named, run in order; `--only` picks some):
    kernels     the fused kernels against eager PyTorch and torch.compile (bench/kernel_sweep.py)
    train_step  one DiffusionNFT step of the built-in toy FLUX.1 Fill: rollout / judge / update (bench/train_step.py)
    judge_terms the rule judge's identity content terms on a step's 48 images (bench/judge_terms.py)
A new section is a function (device, args, log) -> list of row dicts plus its table columns,
registered in SECTIONS.

Prints a table per section. On a GPU the results (device, versions, date, rows) are also written to
bench/results/<device-slug>.json unless --out names another file; on a CPU they are only printed
unless --out is given (CPU numbers do not belong in bench/results/).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable from a checkout without installing
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench import device as device_info  # noqa: E402
from bench import judge_terms, kernel_sweep, train_step  # noqa: E402


def kernels_section(device: torch.device, args: argparse.Namespace, log) -> list[dict]:
    return kernel_sweep.run(device, args.quick, args.peak, log)


def train_step_section(device: torch.device, args: argparse.Namespace, log) -> list[dict]:
    return train_step.run(device, args.quick, log)


COLUMNS = [  # (header, key, format)
    ("kernel", "kernel", "{}"), ("variant", "variant", "{}"), ("size", "size", "{}"), ("dtype", "dtype", "{}"),
    ("impl", "impl", "{}"), ("time us", "time_us", "{:.1f}"), ("dev us", "device_us", "{:.1f}"),
    ("GB/s", "gbps", "{:.1f}"), ("% peak", "pct_peak", "{:.0f}"), ("x eager", "speedup_vs_eager", "{:.2f}"),
    ("x compile", "speedup_vs_compile", "{:.2f}"), ("launches", "launches", "{}"),
    ("+MB", "extra_peak_mb", "{:.1f}"), ("err vs fp64", "rel_err_vs_fp64", "{:.1e}"),
]


def judge_terms_section(device: torch.device, args: argparse.Namespace, log) -> list[dict]:
    return judge_terms.run(device, args.quick, log)


SECTIONS = {"kernels": (kernels_section, COLUMNS, 5), "train_step": (train_step_section, train_step.COLUMNS, 1),
            "judge_terms": (judge_terms_section, judge_terms.COLUMNS, 1)}


def table(rows: list[dict], columns=COLUMNS, left: int = 5) -> str:
    """Text table; the first `left` columns are left-aligned labels, the rest right-aligned numbers."""
    cells = [[h for h, _, _ in columns]]
    for row in rows:
        cells.append(["n/a" if row.get(k) is None else f.format(row[k]) for _, k, f in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
             for line in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer sizes and shorter timings (< 2 min on a CPU)")
    parser.add_argument("--only", action="append", choices=sorted(SECTIONS), help="run only these sections")
    parser.add_argument("--out", type=Path, help="write the JSON here (default on a GPU: bench/results/<slug>.json)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak", type=float, help="nominal memory bandwidth in GB/s (unknown GPUs)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (default 1: stable numbers on a shared machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU")
    info = device_info.describe(device, args.peak)
    args.peak = info["peak_gbps"]
    report = {"schema": 1, "device": info, "versions": device_info.versions(), "quick": args.quick, "sections": {}}
    print(f"# {info['name']}  peak {args.peak or 'n/a'} GB/s  {report['versions']}", flush=True)
    for name in args.only or list(SECTIONS):
        print(f"\n## {name}", flush=True)
        fn, columns, left = SECTIONS[name]
        rows = fn(device, args, lambda line: print(line, flush=True))
        report["sections"][name] = rows
        print("\n" + table(rows, columns, left), flush=True)

    out = args.out or (ROOT / "bench" / "results" / f"{info['slug']}.json" if device.type == "cuda" else None)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))
        print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
