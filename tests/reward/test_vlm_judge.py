import pytest
import torch
from PIL import Image

from reward.judge import JudgeRequest
from reward.judges.vlm_judge import (
    TransformersJudge,
    label_token_id,
    scores_from_label_probs,
)
from reward.vlm.prompts import LABELS
from reward.vlm.tiny_vlm import build_tiny_vlm


@pytest.mark.parametrize("mode", ["score", "yesno", "pairwise"])
def test_batched_scores_equal_unbatched_ones(tiny_vlm, make_requests, mixed_specs, mode):
    judge = TransformersJudge(tiny_vlm, batch_size=8, both_orders=True)
    reqs = make_requests(mixed_specs)   # prompts of different lengths: left padding is exercised
    batched = judge.score(reqs, mode)
    single = torch.cat([judge.score([r], mode) for r in reqs])
    assert batched.shape == (len(reqs),) and ((batched >= 0) & (batched <= 1)).all()
    assert torch.allclose(batched, single, atol=2e-6)
    assert batched.std() > 1e-3   # the tiny judge's answers depend on its input


def test_scores_follow_the_label_distribution(tiny_vlm, make_requests, mixed_specs):
    judge = TransformersJudge(tiny_vlm, both_orders=False)
    reqs = make_requests(mixed_specs[:2])
    convs = judge.conversations(reqs, "score")
    logits = judge.next_token_logits(convs)
    digits = [tiny_vlm.tokenizer.convert_tokens_to_ids(d) for d in LABELS["score"]]
    p = torch.softmax(logits[:, digits], -1)
    assert torch.allclose(judge.score(reqs, "score"), (p * torch.arange(6.0)).sum(-1) / 5, atol=1e-6)
    yes, no = (tiny_vlm.tokenizer.convert_tokens_to_ids(t) for t in ("Yes", "No"))
    ly = judge.next_token_logits(judge.conversations(reqs, "yesno"))
    assert torch.allclose(judge.score(reqs, "yesno"), torch.sigmoid(ly[:, yes] - ly[:, no]), atol=1e-6)


def test_both_orders_cancel_position_bias(tiny_vlm, make_requests, mixed_specs):
    reqs = make_requests(mixed_specs[:2])
    one = TransformersJudge(tiny_vlm, both_orders=False)
    both = TransformersJudge(tiny_vlm, both_orders=True)
    forward = one.score(reqs, "pairwise")
    flipped = [JudgeRequest(r.task, r.dimension, r.source, r.other, r.mask, r.instruction, other=r.edited)
               for r in reqs]
    backward = one.score(flipped, "pairwise")
    assert torch.allclose(both.score(reqs, "pairwise"), (forward + 1 - backward) / 2, atol=1e-6)
    # swapping the images turns P(edited better) into 1 - P(edited better)
    assert torch.allclose(both.score(flipped, "pairwise"), 1 - both.score(reqs, "pairwise"), atol=1e-6)
    probs = torch.tensor([[0.8, 0.2], [0.3, 0.7]])
    assert torch.allclose(scores_from_label_probs(probs, "pairwise", both_orders=True), torch.tensor([0.75]))


def test_score_gradient_matches_finite_differences_fp64():
    parts = build_tiny_vlm(init_std=0.2, seed=1, dtype=torch.float64)
    parts.model.requires_grad_(False)
    judge = TransformersJudge(parts, both_orders=True, show_crop=True, crop_size=28)
    g = torch.Generator().manual_seed(3)
    # 40x52 is resized (both passes) and cropped: the whole tensor path is under test
    src, edit, other = (0.2 + 0.6 * torch.rand(3, 40, 52, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.zeros(1, 40, 52, dtype=torch.float64)
    mask[:, 8:24, 10:30] = 1

    def f(e, mode):
        return judge.score([JudgeRequest("fill", "consistency", src, e, mask, "", other=other)], mode)[0]

    for mode in ("score", "yesno", "pairwise"):
        e = edit.clone().requires_grad_(True)
        f(e, mode).backward()
        assert e.grad is not None and e.grad.abs().sum() > 0
        u = torch.randn(edit.shape, generator=g, dtype=torch.float64)
        # the model keeps norms and rotary tables in fp32, so a step of 1e-3 balances rounding and curvature
        h = 1e-3
        fd = (f(edit + h * u, mode) - f(edit - h * u, mode)) / (2 * h)
        assert torch.allclose((e.grad * u).sum(), fd, rtol=5e-3, atol=1e-6), mode
    with torch.no_grad():
        assert not judge.score([JudgeRequest("fill", "consistency", src, edit.requires_grad_(True), mask, "",
                                             other=other)], "score").requires_grad


def test_save_and_load_round_trip(tiny_vlm, tmp_path, make_requests, mixed_specs):
    tiny_vlm.save_pretrained(tmp_path / "judge")
    loaded = TransformersJudge(str(tmp_path / "judge"), dtype="float32", device="cpu", attn_implementation="sdpa")
    assert not any(p.requires_grad for p in loaded.model.parameters())
    reqs = make_requests(mixed_specs[:2])
    in_memory = TransformersJudge(tiny_vlm, both_orders=True)
    loaded.both_orders = True
    for mode in ("score", "yesno", "pairwise"):
        assert torch.allclose(loaded.score(reqs, mode), in_memory.score(reqs, mode), atol=1e-6)


def test_clear_errors(tiny_vlm, tmp_path, make_requests, mixed_specs):
    with pytest.raises(ValueError, match="directory not found"):
        TransformersJudge(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="not a single token|splits the label"):
        label_token_id(tiny_vlm.tokenizer, "Absolutely")
    with pytest.raises(ValueError, match="batch_size"):
        TransformersJudge(tiny_vlm, batch_size=0)
    with pytest.raises(ValueError, match="unknown judge mode"):
        TransformersJudge(tiny_vlm).score(make_requests(mixed_specs[:1]), "likert")


def test_qwen3_vl_works_through_the_same_code(tmp_path, make_requests, mixed_specs):
    from transformers import Qwen3VLProcessor

    from reward.vlm.prompts import conversation_images
    from reward.vlm.vlm_inputs import _render, encode_conversations

    parts = build_tiny_vlm("qwen3-test", init_std=0.2)
    judge = TransformersJudge(parts, batch_size=4, both_orders=True)
    reqs = make_requests(mixed_specs)
    with torch.no_grad():
        batched = judge.score(reqs, "pairwise")
        single = torch.cat([judge.score([r], "pairwise") for r in reqs])
    assert torch.allclose(batched, single, atol=2e-6) and batched.std() > 1e-3

    class ImageOnlyProcessor(Qwen3VLProcessor):  # the stock one insists on a video processor
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    tok = parts.tokenizer
    convs = judge.conversations(reqs[:2], "yesno")
    ours = encode_conversations(convs, tok, judge.spec, judge.image_token_id)
    texts = [tok.apply_chat_template(_render(c), tokenize=False, add_generation_prompt=True) for c in convs]
    images = [Image.fromarray((x * 255).round().byte().permute(1, 2, 0).numpy())
              for c in convs for x in conversation_images(c)]
    ref = ImageOnlyProcessor(image_processor=parts.image_processor, tokenizer=tok)(
        text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")
    assert torch.equal(ours["input_ids"], ref["input_ids"])
    assert torch.equal(ours["image_grid_thw"], ref["image_grid_thw"])
    parts.save_pretrained(tmp_path / "qwen3")
    loaded = TransformersJudge(str(tmp_path / "qwen3"), both_orders=True)
    assert type(loaded.model).__name__ == "Qwen3VLForConditionalGeneration"
    assert torch.allclose(loaded.score(reqs, "pairwise"), batched, atol=1e-6)


@pytest.mark.cuda
def test_cuda_judge_matches_cpu_and_back_propagates(tiny_vlm, make_requests, mixed_specs):
    import copy
    import dataclasses

    reqs = make_requests(mixed_specs)
    with torch.no_grad():
        expected = TransformersJudge(tiny_vlm, both_orders=True).score(reqs, "pairwise")
    for dtype, atol in (("float32", 5e-3), ("bfloat16", None)):   # cuDNN convolutions may run in TF32
        judge = TransformersJudge(copy.deepcopy(tiny_vlm), device="cuda", dtype=dtype, both_orders=True)
        on_gpu = [dataclasses.replace(r, source=r.source.cuda(), mask=r.mask.cuda(), other=r.other.cuda(),
                                      edited=r.edited.cuda().requires_grad_(True)) for r in reqs]
        scores = judge.score(on_gpu, "pairwise")
        assert scores.device.type == "cuda"
        if atol is not None:
            assert torch.allclose(scores.float().cpu(), expected, atol=atol)
        scores.sum().backward()
        assert all(r.edited.grad is not None and torch.isfinite(r.edited.grad).all() for r in on_gpu)
