import pytest
import torch
from PIL import Image

from reward.vlm.prompts import ChatMessage
from reward.vlm.tiny_vlm import TinyVLMSpec, build_image_processor
from reward.vlm.vlm_inputs import (
    VisionSpec,
    encode_conversations,
    image_patches,
    smart_resize,
)


def _pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray((x * 255).round().byte().permute(1, 2, 0).numpy())


# (H, W): no resize, both up, both down, height down + width up (Pillow's vertical-first case),
# height up + width down, extreme aspect
SIZES = [(56, 56), (40, 52), (150, 130), (45, 90), (60, 20), (28, 140)]


@pytest.mark.parametrize("bounds", [(56 * 56, 56 * 56), (28 * 28, 112 * 112)])
def test_tensor_preprocessing_matches_the_pil_image_processor(bounds):
    processor = build_image_processor(TinyVLMSpec(min_pixels=bounds[0], max_pixels=bounds[1]))
    spec = VisionSpec.from_image_processor(processor)
    g = torch.Generator().manual_seed(1)
    for h, w in SIZES:
        x = (torch.rand(3, h, w, generator=g) * 255).round() / 255
        ref = processor(images=[_pil(x)], return_tensors="pt")
        ours, grid = image_patches(x, spec)
        assert [list(grid)] == ref["image_grid_thw"].tolist()
        assert ours.shape == ref["pixel_values"].shape
        # PIL rounds to 8 bits after each resampling pass; we do not (to stay differentiable)
        grey_levels = (ours - ref["pixel_values"]).abs() * min(spec.std) * 255
        assert grey_levels.max() <= 1.05, (h, w)
        if smart_resize(h, w, spec.factor, spec.min_pixels, spec.max_pixels) == (h, w):
            assert torch.allclose(ours, ref["pixel_values"], atol=1e-6)


def test_preprocessing_is_differentiable_fp64():
    spec = VisionSpec(patch_size=2, merge_size=2, temporal_patch_size=2, min_pixels=64, max_pixels=144,
                      mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.25))
    x = (0.2 + 0.6 * torch.rand(3, 7, 9, dtype=torch.float64)).requires_grad_(True)
    assert image_patches(x, spec)[1] == (1, 4, 4)   # resized 7x9 -> 8x8
    assert torch.autograd.gradcheck(lambda t: image_patches(t, spec)[0], (x,), eps=1e-6, atol=1e-7)


def test_token_layout_matches_the_qwen_processor(tiny_vlm):
    from transformers import Qwen2_5_VLProcessor

    class ImageOnlyProcessor(Qwen2_5_VLProcessor):  # the stock one insists on a video processor
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    tok, ip = tiny_vlm.tokenizer, tiny_vlm.image_processor
    g = torch.Generator().manual_seed(0)
    imgs = [(torch.rand(3, h, w, generator=g) * 255).round() / 255 for h, w in ((40, 52), (56, 56))]
    conv = [ChatMessage("system", ["Be strict."]), ChatMessage("user", [imgs[0], imgs[1], "Which is better?"])]
    ours = encode_conversations([conv], tok, VisionSpec.from_image_processor(ip), tiny_vlm.model.config.image_token_id)
    messages = [{"role": "system", "content": "Be strict."},
                {"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                             {"type": "text", "text": "Which is better?"}]}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ref = ImageOnlyProcessor(image_processor=ip, tokenizer=tok)(text=[text], images=[_pil(x) for x in imgs],
                                                                return_tensors="pt")
    assert torch.equal(ours["input_ids"], ref["input_ids"])
    assert torch.equal(ours["mm_token_type_ids"], ref["mm_token_type_ids"].int())
    assert torch.equal(ours["image_grid_thw"], ref["image_grid_thw"])


def test_batches_are_left_padded(tiny_vlm):
    tok, spec = tiny_vlm.tokenizer, VisionSpec.from_image_processor(tiny_vlm.image_processor)
    img = torch.rand(3, 56, 56)
    short = [ChatMessage("user", [img, "Yes?"])]
    long = [ChatMessage("user", [img, "A much longer question about the same image, is it fine?"])]
    enc = encode_conversations([short, long], tok, spec, tiny_vlm.model.config.image_token_id)
    assert enc["attention_mask"][0, 0] == 0 and enc["attention_mask"][:, -1].all()
    assert enc["pixel_values"].shape[0] == 2 * 16


def test_bad_inputs_are_clear_errors(tiny_vlm):
    spec = VisionSpec.from_image_processor(tiny_vlm.image_processor)
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        image_patches(torch.rand(4, 28, 28), spec)
    with pytest.raises(ValueError, match="Qwen2-VL-family"):
        VisionSpec.from_image_processor(object())
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(1, 300, 28, 56 * 56, 10**6)
