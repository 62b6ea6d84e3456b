"""A memory plan as the text table `python -m rl.plan` prints."""
from __future__ import annotations

import textwrap

from rl.planning.memory_plan import HEADROOM, MemoryPlan, human_bytes

_WIDTH = 100
_GROUPS = {"weights": "weights", "training": "training", "judge": "judge", "step": "step peak", "runtime": "runtime"}


def human_count(n: int | None) -> str:
    """Parameter counts: 11.90 B, 52.30 M, 9.40 K, 512."""
    if n is None:
        return ""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(n)


def _wrap(text: str, first: str, rest: str) -> list[str]:
    return textwrap.wrap(text, _WIDTH, initial_indent=first, subsequent_indent=rest, break_on_hyphens=False)


def render(plan: MemoryPlan, title: str = "") -> str:
    """The header, one row per line (grouped), the total against the GPU, the verdict, notes and advice."""
    gpus = f"{plan.gpus} x {plan.gpu_memory_gib:g} GiB GPU{'s' if plan.gpus > 1 else ''}"
    how = ("FSDP2: rows marked 1/N are divided over the GPUs" if any("1/" in r.label for r in plan.rows)
           else "DDP: every GPU holds every row")
    out = [f"Memory plan{' of ' + title if title else ''} on {gpus} ({how})", ""]
    for line in plan.header:  # "policy   ...": continuation lines align after the 9-character key
        out += textwrap.wrap(line, _WIDTH, initial_indent="  ", subsequent_indent=" " * 11)
    width = max(len(r.label) for r in plan.rows) + 2
    out += ["", f"  {'per GPU':<11}{'':<{width}}{'params':>10}  {'dtype':<9}{'memory':>11}"]
    group = None
    for r in plan.rows:
        name = _GROUPS[r.group] if r.group != group else ""
        group = r.group
        out.append(f"  {name:<11}{r.label:<{width}}{human_count(r.params):>10}  {r.dtype:<9}{human_bytes(r.bytes):>11}")
    rule = "  " + "-" * (11 + width + 10 + 2 + 9 + 11)
    share = plan.total_bytes / plan.gpu_bytes
    total = f"  {'total':<11}{'':<{width}}{'':>10}  {'':<9}{human_bytes(plan.total_bytes):>11}"
    out += [rule, f"{total}  of {plan.gpu_memory_gib:g} GiB ({share:.0%})", ""]
    spare = plan.gpu_bytes - plan.total_bytes
    if plan.verdict == "fits":
        verdict = f"verdict: fits, {human_bytes(spare)} to spare per GPU"
    elif plan.verdict == "tight":
        verdict = (f"verdict: tight, over {HEADROOM:.0%} of the GPU ({human_bytes(spare)} left): allocator "
                   "fragmentation may not leave room")
    else:
        verdict = f"verdict: does not fit, {human_bytes(-spare)} over per GPU"
    out.append(verdict)
    out += [part for w in plan.warnings for part in _wrap(w, "warning: ", " " * 9)]
    if plan.advice:
        out += ["", "to fit, change (each re-planned):"]
        out += [part for a in plan.advice for part in _wrap(a, "  - ", " " * 4)]
    out += ["", "notes:"] + [part for n in plan.notes for part in _wrap(n, "  - ", " " * 4)]
    return "\n".join(out)
