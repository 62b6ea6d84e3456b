"""`python -m reward.train`: fine-tune a VLM judge on pairwise preferences (OneReward section 4.3).

For every pair and every dimension it carries, the judge sees the pairwise question twice: winner
first (target "Yes") and loser first (target "No"); the loss is the cross-entropy of the target
token over the whole vocabulary at the answer position. Training is LoRA (peft) for a pretrained
VLM and full fine-tuning for the built-in tiny one (force either with --set lora=true / false).
Held-out pairwise accuracy is reported per task and dimension (OneReward's table 1: rows tasks,
columns dimensions; a pair counts as right when the both-orders P(winner better) exceeds 0.5),
before and after training, printed and saved as JSON. The checkpoint (LoRA merged, plus tokenizer
and image processor) loads in `TransformersJudge(dir)`.

Settings are config keys (RewardTrainConfig): `--config FILE.yaml` and `--set KEY=VALUE`, listed
with their defaults and meanings by `--help`; `--out DIR` names the output directory.

Without `data` the built-in demo runs: a data builder named by `demo_builder` ("module:function",
called as `fn(out_dir: Path, *, n_pairs: int, seed: int, label_noise: float) -> Path` of a JSONL
file in the format of reward/training/preference_data.py) makes the pairs, and a tiny Qwen2.5-VL (`model`
tiny, preset `tiny_preset`) is trained on them.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import random
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from core.config.cli import config_parser, parse_config
from core.config.loading import ConfigError
from core.config.schema import POSITIVE, UNIT, Range, at_least, check_ranges, opt
from core.tasks import DIMENSIONS, TASKS
from reward.judge import JudgeRequest
from reward.judges.vlm_judge import TransformersJudge
from reward.training.adversarial import adversarial_requests
from reward.training.pairwise_loss import pairwise_loss
from reward.training.preference_data import (
    PreferencePair,
    PreferenceRecord,
    load_pair,
    read_preferences,
)
from reward.vlm.judge_card import JudgeCard
from reward.vlm.vlm_parts import VLMParts, load_vlm, resolve_dtype


@dataclasses.dataclass
class RewardTrainConfig:
    """Every setting of `python -m reward.train` (--config FILE.yaml, --set KEY=VALUE)."""

    data: str | None = opt(None, "preference JSONL (format: reward/training/preference_data.py); null = build the demo data")
    out: str = opt("runs/reward_model", "metrics, config and the judge checkpoint (out/judge); also --out DIR")
    model: str = opt("tiny", '"tiny" (built offline), a local dir or a cached Hub id')
    tiny_preset: str = opt("demo", 'reward.vlm.tiny_vlm.PRESETS, for model == "tiny"')
    tiny_init_std: float = opt(0.1, "see build_tiny_vlm: at 0.02 its Yes/No logits barely move")
    loss_over: Literal["vocab", "labels"] = opt(
        "vocab", '"vocab": cross-entropy over every token (OneReward); "labels": over Yes/No only (what the '
                 "judge's score reads)")
    # the tiny model's weights are random: adapters over frozen random features learned nothing
    # (50% held-out), so it is fully fine-tuned
    lora: bool | None = opt(None, "train LoRA adapters; null: full fine-tuning for the tiny model, LoRA for a "
                                  "pretrained VLM")
    lora_r: int = opt(8, "LoRA rank")
    lora_alpha: int = opt(16, "LoRA scale numerator: the update is (alpha / r) B A")
    lora_dropout: float = opt(0.0, "dropout on the LoRA branch")
    lora_targets: list[str] = opt(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                  "names of the Linear layers that get adapters")
    # a tiny random model needs big steps to lift Yes/No out of a flat distribution; a pretrained
    # VLM needs small ones (OneReward fully fine-tuned Qwen2.5-VL-7B at 1e-6)
    lr: float | None = opt(None, "AdamW learning rate; null: 1e-3 (tiny, full) / 5e-3 (tiny, LoRA) / 1e-4 otherwise")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    epochs: int = opt(6, "passes over the training pairs")
    batch_size: int = opt(4, "pairs per step (each shown in both orders)")
    grad_clip: float = opt(1.0, "largest gradient norm; larger gradients are scaled down to it")
    heldout_fraction: float = opt(0.2, 'share of the pairs held out, used when no record has a "split"')
    seed: int = opt(0, "seed of the tiny model, the split, the data order and the demo data")
    dtype: str = opt("float32", "weights dtype: float32, bfloat16, float16 (or fp32, bf16, fp16, float64)")
    device: str = opt("auto", '"auto" = cuda when available, else cpu')
    attn_implementation: str | None = opt(None, "transformers attention implementation (null = its default)")
    max_pixels: int | None = opt(None, "cap on image pixels the VLM sees")
    show_source: bool = opt(True, "pairwise queries also show the input image")
    # on 64x64 edits the edited region is a few patches of the full view
    show_crop: bool = opt(True, "also show a crop around the mask")
    crop_size: int = opt(224, "side of that crop in pixels")
    templates: str | dict[str, str] | None = opt(None, "judge template overrides (YAML path or mapping)")
    demo_builder: str = opt("reward.training.demo_data:build_demo_data", 'the demo data builder, "module:function"')
    demo_pairs: int = opt(2400, "preference pairs of the demo data: 2400 rebuilds the shipped judge "
                                "(reward/assets/tiny_judge; ~30 min on one CPU core); 480 takes ~5 min for ~77%")
    label_noise: float = opt(0.1, "demo data: probability that the simulated annotator errs")
    # reward feedback learning climbs the judge's image gradient; a judge robust to small perturbations
    # has gradients that follow what it measures (reward/training/adversarial.py)
    adversarial_eps: float = opt(0.0, "robust training: PGD perturbs both edits of each training pair inside the "
                                      "edited region by at most this (pixel values in [0, 1]) to flip the judge's "
                                      "answer, and the judge learns the clean label on them (0 = off)")
    adversarial_steps: int = opt(2, "PGD steps per batch when adversarial_eps > 0 (each one more forward / backward)")
    adversarial_kind: Literal["pixels", "tint"] = opt(
        "pixels", "what PGD may change: every pixel of the edited region, or one colour offset per channel over it")
    progress: bool = opt(True, "show a progress bar")

    def __post_init__(self) -> None:
        check_ranges(self, RANGES, "reward/train.py RANGES")
        try:
            resolve_dtype(self.dtype)
        except ValueError as err:
            raise ConfigError(f"dtype: {err}") from None
        if self.adversarial_eps == 0 and (self.adversarial_steps != 2 or self.adversarial_kind != "pixels"):
            raise ConfigError("adversarial_steps / adversarial_kind are used only with adversarial_eps > 0: set "
                              "adversarial_eps, or leave them at their defaults")
        if self.adversarial_kind not in ("pixels", "tint"):  # from_dict checks this; direct construction does not
            raise ConfigError(f"adversarial_kind must be 'pixels' or 'tint', got {self.adversarial_kind!r}")
        if self.loss_over not in ("vocab", "labels"):  # from_dict checks this; direct construction does not
            raise ConfigError(f"loss_over must be 'vocab' or 'labels', got {self.loss_over!r}")

    def resolved(self) -> RewardTrainConfig:
        """A copy with `lora` and `lr` decided (null means: by `model`, see their meanings)."""
        lora = self.model != "tiny" if self.lora is None else self.lora
        lr = ((5e-3 if lora else 1e-3) if self.model == "tiny" else 1e-4) if self.lr is None else self.lr
        return dataclasses.replace(self, lora=lora, lr=lr)


#: allowed values of every numeric key of RewardTrainConfig (a test asserts that none is missing)
RANGES: dict[str, Range] = {
    "tiny_init_std": POSITIVE,
    "lora_r": at_least(1),
    "lora_alpha": POSITIVE,
    "lora_dropout": Range(0, 1, open_hi=True),
    "lr": Range(0, 1, open_lo=True),
    "weight_decay": UNIT,
    "epochs": at_least(1),
    "batch_size": at_least(1),
    "grad_clip": POSITIVE,
    "heldout_fraction": Range(0, 1, open_lo=True, open_hi=True, note="both splits need pairs"),
    "seed": at_least(0),
    "max_pixels": at_least(28 * 28),
    "crop_size": at_least(1),
    "demo_pairs": at_least(2, "one to train on, one held out"),
    "label_noise": Range(0, 0.5, note="0.5 = labels carry no signal"),
    "adversarial_eps": UNIT,
    "adversarial_steps": at_least(1),
}


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
        from reward.vlm.tiny_vlm import build_tiny_vlm

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
        raise ValueError(f"no data given and the demo data builder {cfg.demo_builder!r} is not available "
                         f"({err}); set data to a preference JSONL, --set data=FILE.jsonl (format: "
                         "reward/training/preference_data.py)") from err
    return Path(builder(out / "demo_data", n_pairs=cfg.demo_pairs, seed=cfg.seed, label_noise=cfg.label_noise))


def train_reward_model(cfg: RewardTrainConfig) -> TrainResult:
    """Train, evaluate before and after, save the checkpoint and the metrics under `cfg.out`."""
    cfg = cfg.resolved()
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
    rng = random.Random(cfg.seed)
    attack_gen = torch.Generator().manual_seed(cfg.seed)
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
            if cfg.adversarial_eps > 0:
                requests = adversarial_requests(judge, requests, cfg.adversarial_eps, cfg.adversarial_steps,
                                                cfg.loss_over, generator=attack_gen, kind=cfg.adversarial_kind)
            loss = pairwise_loss(judge, requests, cfg.loss_over)
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
    JudgeCard(modes=("pairwise",), view=dataclasses.asdict(judge.view), max_pixels=cfg.max_pixels,
              templates=cfg.templates, made_by=made_by(cfg),
              heldout_accuracy=after["overall"]["accuracy"]).save(judge_dir)
    metrics = {"before": before, "after": after, "steps": len(losses), "final_loss": losses[-1] if losses else None,
               "train_pairs": len(train_records), "heldout_pairs": len(heldout_records), "data": str(data)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    return TrainResult(judge_dir, metrics, p_yes)


def made_by(cfg: RewardTrainConfig) -> str:
    """The command that rebuilds this judge: every setting that differs from the defaults."""
    default = RewardTrainConfig(model=cfg.model).resolved()  # lora and lr resolved as cfg's were

    def value(v: Any) -> str:
        return v if isinstance(v, str) else json.dumps(v)

    base = RewardTrainConfig()
    sets = [f"--set {f.name}={value(getattr(cfg, f.name))}" for f in dataclasses.fields(cfg)
            if f.name not in ("out", "progress")
            and getattr(cfg, f.name) != getattr(base if f.name == "model" else default, f.name)]
    return " ".join(["python -m reward.train", *sets])


def save_judge(parts: VLMParts, directory: Path) -> Path:
    """Merge LoRA (if any) into the weights and save model, tokenizer and image processor."""
    model = parts.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.requires_grad_(False)
    return VLMParts(model, parts.tokenizer, parts.image_processor).save_pretrained(directory)


# -- command line ---------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    """The command line: the config keys, plus --out as the usual name of the key `out`."""
    p = config_parser("python -m reward.train", __doc__.split("\n\n")[0], RewardTrainConfig, ranges=RANGES,
                      example="data=prefs.jsonl")
    p.add_argument("--out", metavar="DIR", help="the same as --set out=DIR (wins over it)")
    return p


def main(argv: list[str] | None = None) -> TrainResult:
    """`python -m reward.train [--config FILE.yaml] [--set KEY=VALUE ...] [--out DIR]`."""
    args, cfg = parse_config(parser(), RewardTrainConfig, argv)
    if args.out is not None:
        cfg = dataclasses.replace(cfg, out=args.out)
    result = train_reward_model(cfg)
    print("held-out pairwise accuracy before training:\n" + format_table(result.metrics["before"]))
    print("after training:\n" + format_table(result.metrics["after"]))
    print(f"judge saved to {result.judge_dir}; metrics in {Path(cfg.out) / 'metrics.json'}")
    return result


if __name__ == "__main__":
    main()
