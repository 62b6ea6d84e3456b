"""`python -m reward.train`: fine-tune a VLM judge on pairwise preferences (OneReward section 4.3).

For every pair and every dimension it carries, the judge sees the pairwise question twice: winner
first (target "Yes") and loser first (target "No"); the loss is the cross-entropy of the target
token over the whole vocabulary at the answer position. Training is LoRA (peft) for a pretrained
VLM and full fine-tuning for the built-in tiny one (force either with --lora / --no-lora).
Held-out pairwise accuracy is reported per task and dimension (OneReward's table 1: rows tasks,
columns dimensions; a pair counts as right when the both-orders P(winner better) exceeds 0.5),
before and after training, printed and saved as JSON. The checkpoint (LoRA merged, plus tokenizer
and image processor) loads in `TransformersJudge(dir)`.

Without --data the built-in demo runs: a data builder named by --demo-builder ("module:function",
called as `fn(out_dir: Path, *, n_pairs: int, seed: int, label_noise: float) -> Path` of a JSONL
file in the format of reward/preference_data.py) makes the pairs, and a tiny Qwen2.5-VL
(--model tiny, preset --tiny-preset) is trained on them.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import random
import typing
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from core.tasks import DIMENSIONS, TASKS

from .judge import JudgeRequest
from .preference_data import PreferencePair, PreferenceRecord, load_pair, read_preferences
from .vlm_judge import TransformersJudge
from .vlm_parts import VLMParts, load_vlm, resolve_dtype


@dataclasses.dataclass
class RewardTrainConfig:
    """Every option of `python -m reward.train` (flags are the field names with dashes)."""

    data: str | None = None                  # preference JSONL; None = build the demo data
    out: str = "runs/reward_model"           # metrics, config and the judge checkpoint (out/judge)
    model: str = "tiny"                      # "tiny" (built offline), a local dir or a cached Hub id
    tiny_preset: str = "demo"                # reward.tiny_vlm.PRESETS, for model == "tiny"
    tiny_init_std: float = 0.1               # see build_tiny_vlm: at 0.02 its Yes/No logits barely move
    loss_over: str = "vocab"                 # "vocab": cross-entropy over every token (OneReward);
                                             # "labels": over Yes/No only (what the judge's score reads)
    lora: bool | None = None                 # None: full fine-tuning for the tiny model (its weights are
                                             # random: adapters over frozen random features learned nothing,
                                             # 50% held-out), LoRA for a pretrained VLM
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: list[str] = dataclasses.field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    lr: float | None = None                  # None: 1e-3 (tiny, full) / 5e-3 (tiny, LoRA) / 1e-4 otherwise
    weight_decay: float = 0.0
    epochs: int = 6
    batch_size: int = 4                      # pairs per step (each shown in both orders)
    grad_clip: float = 1.0
    heldout_fraction: float = 0.2            # used when no record has a "split"
    seed: int = 0
    dtype: str = "float32"
    device: str = "auto"
    attn_implementation: str | None = None
    max_pixels: int | None = None
    show_source: bool = True                 # pairwise queries also show the input image
    show_crop: bool = True                   # also show a crop around the mask: on 64x64 edits the
                                             # edited region is a few patches of the full view
    crop_size: int = 224
    templates: str | dict[str, str] | None = None   # judge template overrides (YAML path or mapping)
    demo_builder: str = "reward.demo_data:build_demo_data"
    demo_pairs: int = 480
    label_noise: float = 0.1
    progress: bool = True

    def __post_init__(self) -> None:
        if self.lora is None:
            self.lora = self.model != "tiny"
        if self.lr is None:
            # a tiny random model needs big steps to lift Yes/No out of a flat distribution; a
            # pretrained VLM needs small ones (OneReward fully fine-tuned Qwen2.5-VL-7B at 1e-6)
            self.lr = (5e-3 if self.lora else 1e-3) if self.model == "tiny" else 1e-4
        for name in ("lora_r", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        resolve_dtype(self.dtype)
        if self.loss_over not in ("vocab", "labels"):
            raise ValueError(f"loss_over must be 'vocab' or 'labels', got {self.loss_over!r}")


@dataclasses.dataclass
class TrainResult:
    judge_dir: Path                          # the saved checkpoint
    metrics: dict[str, Any]                  # {"before": table, "after": table, "steps": ...}
    heldout_p_yes: Tensor                    # P(Yes) of the trained model (before merging) on the
                                             # held-out queries, in `pairwise_queries` order


# -- data -----------------------------------------------------------------------------------------
def split_records(records: list[PreferenceRecord], heldout_fraction: float,
                  seed: int) -> tuple[list[PreferenceRecord], list[PreferenceRecord]]:
    """The records' own splits when any has one, else a seeded random split."""
    if any(r.split is not None for r in records):
        train = [r for r in records if r.split != "heldout"]
        heldout = [r for r in records if r.split == "heldout"]
    else:
        order = list(range(len(records)))
        random.Random(seed).shuffle(order)
        n_held = max(1, round(heldout_fraction * len(records)))
        heldout = [records[i] for i in sorted(order[:n_held])]
        train = [records[i] for i in sorted(order[n_held:])]
    if not train or not heldout:
        raise ValueError(f"need both training and held-out pairs, got {len(train)} and {len(heldout)}: "
                         "add records or change the splits / heldout_fraction")
    return train, heldout


def pairwise_requests(pairs: list[PreferencePair]) -> tuple[list[JudgeRequest], list[tuple[str, str]]]:
    """One request per (pair, dimension), the winner as `edited` and the loser as `other`."""
    reqs, keys = [], []
    for p in pairs:
        for dim in p.record.dimensions:
            reqs.append(JudgeRequest(p.record.task, dim, p.source, p.winner, p.mask, p.record.prompt, other=p.loser))
            keys.append((p.record.task, dim))
    return reqs, keys


# -- model ----------------------------------------------------------------------------------------
def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_base(cfg: RewardTrainConfig) -> VLMParts:
    if cfg.model == "tiny":
        from .tiny_vlm import build_tiny_vlm

        parts = build_tiny_vlm(cfg.tiny_preset, seed=cfg.seed, dtype=resolve_dtype(cfg.dtype),
                               init_std=cfg.tiny_init_std)
        return VLMParts(parts.model.to(_device(cfg.device)), parts.tokenizer, parts.image_processor)
    return load_vlm(cfg.model, dtype=cfg.dtype, device=_device(cfg.device), attn_implementation=cfg.attn_implementation)


def add_lora(parts: VLMParts, cfg: RewardTrainConfig) -> VLMParts:
    from peft import LoraConfig, get_peft_model

    targets = sorted({name.rsplit(".", 1)[-1] for name, mod in parts.model.named_modules()
                      if isinstance(mod, torch.nn.Linear)} & set(cfg.lora_targets))
    if not targets:
        raise ValueError(f"none of lora_targets {cfg.lora_targets} names a Linear layer of {type(parts.model).__name__}")
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets)
    return dataclasses.replace(parts, model=get_peft_model(parts.model, lora))


def make_judge(parts: VLMParts, cfg: RewardTrainConfig) -> TransformersJudge:
    return TransformersJudge(parts, batch_size=2 * cfg.batch_size, both_orders=True, show_source=cfg.show_source,
                             show_crop=cfg.show_crop, crop_size=cfg.crop_size, templates=cfg.templates, max_pixels=cfg.max_pixels)


def pairwise_p_yes(judge: TransformersJudge, requests: list[JudgeRequest]) -> Tensor:
    """P(Yes) (restricted to Yes/No) of every query, interleaved (winner first, loser first)."""
    logits = judge.next_token_logits(judge.conversations(requests, "pairwise"))
    return torch.softmax(logits[:, judge.label_ids["pairwise"]], dim=-1)[:, 0]


# -- evaluation -----------------------------------------------------------------------------------
def accuracy_table(judge: TransformersJudge, pairs: list[PreferencePair]) -> dict[str, Any]:
    """{"cells": {task: {dimension: {"accuracy", "n"}}}, "overall": ...}; right = P(winner better) > 0.5."""
    requests, keys = pairwise_requests(pairs)
    with torch.no_grad():
        p_yes = pairwise_p_yes(judge, requests)
    p_winner = (p_yes[0::2] + 1 - p_yes[1::2]) / 2
    right: dict[tuple[str, str], list[bool]] = defaultdict(list)
    for key, p in zip(keys, p_winner.tolist()):
        right[key].append(p > 0.5)
    cells: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
    for (task, dim), hits in right.items():
        cells[task][dim] = {"accuracy": sum(hits) / len(hits), "n": len(hits)}
    every = [h for hits in right.values() for h in hits]
    return {"cells": dict(cells), "overall": {"accuracy": sum(every) / len(every), "n": len(every)}}


def format_table(table: dict[str, Any]) -> str:
    """Rows tasks, columns dimensions, cells "accuracy% (n)"."""
    tasks = [t for t in TASKS if t in table["cells"]]
    dims = [d for d in DIMENSIONS if any(d in table["cells"][t] for t in tasks)]
    head = ["task"] + [d.replace("_", " ") for d in dims]
    rows = [[t] + [f"{100 * c['accuracy']:.1f} ({c['n']})" if (c := table["cells"][t].get(d)) else "-" for d in dims]
            for t in tasks]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in [head, *rows]]
    o = table["overall"]
    return "\n".join(lines + [f"overall {100 * o['accuracy']:.1f}% of {o['n']} held-out (pair, dimension)s"])


# -- training -------------------------------------------------------------------------------------
def demo_data(cfg: RewardTrainConfig, out: Path) -> Path:
    module_name, _, fn_name = cfg.demo_builder.partition(":")
    try:
        builder = getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"no --data given and the demo data builder {cfg.demo_builder!r} is not available "
                         f"({err}); pass --data FILE.jsonl (format: reward/preference_data.py)") from err
    return Path(builder(out / "demo_data", n_pairs=cfg.demo_pairs, seed=cfg.seed, label_noise=cfg.label_noise))


def train_reward_model(cfg: RewardTrainConfig) -> TrainResult:
    """Train, evaluate before and after, save the checkpoint and the metrics under `cfg.out`."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(cfg.data) if cfg.data is not None else demo_data(cfg, out)
    train_records, heldout_records = split_records(read_preferences(data), cfg.heldout_fraction, cfg.seed)
    heldout = [load_pair(r) for r in heldout_records]
    torch.manual_seed(cfg.seed)
    parts = load_base(cfg)
    if cfg.lora:
        parts = add_lora(parts, cfg)
    judge = make_judge(parts, cfg)
    model = parts.model
    model.eval()
    before = accuracy_table(judge, heldout)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    yes_id, no_id = judge.label_ids["pairwise"]
    rng = random.Random(cfg.seed)
    steps_per_epoch = -(-len(train_records) // cfg.batch_size)
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.epochs * steps_per_epoch, desc="reward model", disable=not cfg.progress)
    losses = []
    model.train()
    for _ in range(cfg.epochs):
        order = list(train_records)
        rng.shuffle(order)
        for i in range(0, len(order), cfg.batch_size):
            requests, _ = pairwise_requests([load_pair(r) for r in order[i:i + cfg.batch_size]])
            logits = judge.next_token_logits(judge.conversations(requests, "pairwise"))
            # rows alternate winner-first (answer Yes) and loser-first (answer No)
            if cfg.loss_over == "labels":
                logits, target = logits[:, [yes_id, no_id]], torch.tensor([0, 1] * len(requests))
            else:
                target = torch.tensor([yes_id, no_id] * len(requests))
            loss = torch.nn.functional.cross_entropy(logits, target.to(logits.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
            optimizer.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    model.eval()
    after = accuracy_table(judge, heldout)
    with torch.no_grad():
        p_yes = pairwise_p_yes(judge, pairwise_requests(heldout)[0]).cpu()
    judge_dir = save_judge(parts, out / "judge")
    metrics = {"before": before, "after": after, "steps": len(losses), "final_loss": losses[-1] if losses else None,
               "train_pairs": len(train_records), "heldout_pairs": len(heldout_records), "data": str(data)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    return TrainResult(judge_dir, metrics, p_yes)


def save_judge(parts: VLMParts, directory: Path) -> Path:
    """Merge LoRA (if any) into the weights and save model, tokenizer and image processor."""
    model = parts.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.requires_grad_(False)
    return VLMParts(model, parts.tokenizer, parts.image_processor).save_pretrained(directory)


# -- command line ---------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m reward.train", description=__doc__.split("\n\n")[0])
    hints = typing.get_type_hints(RewardTrainConfig)
    for f in dataclasses.fields(RewardTrainConfig):
        flag, default, hint = "--" + f.name.replace("_", "-"), (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default), hints[f.name]
        if hint in (bool, bool | None):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif hint == list[str]:
            p.add_argument(flag, nargs="+", default=default)
        else:
            base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
            p.add_argument(flag, type=base, default=default)
    return p


def main(argv: list[str] | None = None) -> TrainResult:
    cfg = RewardTrainConfig(**vars(_parser().parse_args(argv)))
    result = train_reward_model(cfg)
    print("held-out pairwise accuracy before training:\n" + format_table(result.metrics["before"]))
    print("after training:\n" + format_table(result.metrics["after"]))
    print(f"judge saved to {result.judge_dir}; metrics in {Path(cfg.out) / 'metrics.json'}")
    return result


if __name__ == "__main__":
    main()
