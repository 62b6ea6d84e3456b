"""Does reward feedback learning climb a judge towards the truth? Measure its gradients before RL.

    python bench/judge_gradients.py --config configs/tiny_onereward.yaml --steps 4 [--set KEY=VALUE ...]

ReFL follows the gradient of the judge's answer with respect to the policy's weights. For `--steps`
ReFL batches of the config (the base model, exactly as training steps 0, 1, ... would draw them) this
takes that gradient (the sum over images of P(policy's edit beats the reference's)) three ways:

- g_judge: the config's judge against the step's reference edits;
- g_again: the config's judge against a second draw of reference edits (other noise);
- g_rule:  the rule judge (the synthetic world's annotator, what a learned judge imitates) asked the
           same pairwise question against the step's reference edits;

and reports the mean cosines cos(g_judge, g_rule) — *alignment*: does a step up this judge go up the
annotator? — and cos(g_judge, g_again) — *consistency*: does the direction depend on what it is
compared with? For scale, the rule judge's own cos(g_rule, g_rule against the second draw) is
printed too. A judge that compares like a Bradley-Terry model, P = sigmoid(f(edit) - f(reference)),
has consistency near 1 whatever its quality (its direction is the gradient of f at the edit);
alignment is what says whether ReFL will climb towards the annotator (docs/results.md: the tiny
learned judges sit at |alignment| < 0.05, the rule judge against other references at 0.67). Per task
it also prints the mean colour of the judge's image gradient in the edited region (per channel, in
units of the mean |gradient|): a large coherent value is a judge that wants a tint. Only for
data.source world and train.algorithm refl.
"""
from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable from a checkout without installing
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

_SECOND_DRAW = 9  # a generator stream the training step does not use


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def gradients(cfg, steps: int) -> dict:
    import rl.train
    from reward.judges.rule_judge import RuleJudge
    from rl.algorithms.reward_scoring import judge_images
    from rl.algorithms.trainer import step_generator
    from rl.plumbing.distributed import init_distributed

    if cfg.data.source != "world":
        raise ValueError("judge gradients need the synthetic world's rule judge: data.source must be world")
    if cfg.train.algorithm != "refl":
        raise ValueError(f"train.algorithm {cfg.train.algorithm!r} does not climb the judge's gradient: use refl")
    trainer = rl.train.make_trainer(cfg, init_distributed(cfg.model.device))
    rule = RuleJudge()
    params = list(trainer.params.values())

    def weight_gradient(judge, batch, others, colours=None) -> torch.Tensor:
        images = trainer.one_step_images(batch)
        reward = judge_images(judge, batch.samples, images, mode="pairwise", others=others).per_image.sum()
        grads = torch.autograd.grad(reward, params + [images], allow_unused=True)
        if colours is not None:
            for img_grad, s in zip(grads[-1], batch.samples):
                inside = img_grad[:, s.mask[0] > 0.5]
                colours[s.task].append(inside.mean(1) / inside.abs().mean().clamp_min(1e-30))
        return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads[:-1], params)])

    cos: dict[str, list[float]] = defaultdict(list)
    colours: dict[str, list[torch.Tensor]] = defaultdict(list)
    for step in range(steps):
        batch = trainer.rollout(step)
        noise = torch.randn(batch.x_k.shape, generator=step_generator(cfg.train.seed, step, _SECOND_DRAW))
        with torch.no_grad():
            x_ref = trainer.generate(batch.cond, noise.to(batch.x_k), trainer.reference_weights)
            second = trainer.policy.decode(x_ref, batch.cond)
        g_judge = weight_gradient(trainer.judge, batch, batch.ref_images, colours)
        g_again = weight_gradient(trainer.judge, batch, second)
        g_rule = weight_gradient(rule, batch, batch.ref_images)
        g_rule_again = weight_gradient(rule, batch, second)
        cos["alignment"].append(_cosine(g_judge, g_rule))
        cos["consistency"].append(_cosine(g_judge, g_again))
        cos["rule_consistency"].append(_cosine(g_rule, g_rule_again))
    out = {k: sum(v) / len(v) for k, v in cos.items()}
    out["colour"] = {t: torch.stack(v).mean(0).tolist() for t, v in colours.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    from bench.judge_probe_cli import probe_config

    steps, cfg = probe_config(__doc__, "a ReFL run config", 4, "ReFL batches (refl.batch_size conditions each)", argv)
    r = gradients(cfg, steps)
    print(f"ReFL weight gradients of the {cfg.judge.kind} judge over {steps} batches of {cfg.refl.batch_size}:")
    print(f"  alignment   cos(judge, rule judge)                  {r['alignment']:+.3f}")
    print(f"  consistency cos(judge, judge vs other references)   {r['consistency']:+.3f}")
    print(f"  for scale   cos(rule judge, rule vs other refs)     {r['rule_consistency']:+.3f}")
    for task, (red, green, blue) in r["colour"].items():
        print(f"  {task:8s} image gradient's mean colour in the edited region R {red:+.2f} G {green:+.2f} B {blue:+.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
