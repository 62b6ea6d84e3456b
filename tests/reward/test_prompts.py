import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from reward.judge import JudgeRequest
from reward.vlm.prompts import JudgeTemplates, build_conversation, conversation_images
from reward.vlm.views import JudgeView, crop_box, mask_crop


def _request(task="fill", dim="text_alignment", instruction="a red circle", other=True):
    g = torch.Generator().manual_seed(0)
    src, edit, oth = (torch.rand(3, 40, 60, generator=g) for _ in range(3))
    mask = torch.zeros(1, 40, 60)
    mask[:, 10:20, 30:50] = 1
    return JudgeRequest(task, dim, src, edit, mask, instruction, other=oth if other else None)


def _text(conv):
    return "".join(p for m in conv for p in m.parts if isinstance(p, str))


@pytest.mark.parametrize("mode", ["score", "yesno", "pairwise"])
def test_query_names_task_and_dimension_and_shows_prompt_only_where_it_matters(mode):
    t, v = JudgeTemplates(), JudgeView()
    aligned = _text(build_conversation(_request(dim="text_alignment"), mode, t, v))
    assert "text alignment" in aligned and "image fill" in aligned and "a red circle" in aligned
    for dim in ("consistency", "structure", "aesthetics"):
        other = _text(build_conversation(_request(dim=dim), mode, t, v))
        assert dim in other and "a red circle" not in other
    text = _text(build_conversation(_request(task="text", dim="text_accuracy", instruction='"AB"'), mode, t, v))
    assert '"AB"' in text and "text rendering" in text


def test_pairwise_order_swap_and_crops():
    req = _request()
    t = JudgeTemplates()
    plain = conversation_images(build_conversation(req, "pairwise", t, JudgeView()))
    assert [id(x) for x in plain] == [id(req.source), id(req.edited), id(req.other)]
    swapped = conversation_images(build_conversation(req, "pairwise", t, JudgeView(), swap=True))
    assert [id(x) for x in swapped] == [id(req.source), id(req.other), id(req.edited)]
    no_src = conversation_images(build_conversation(req, "pairwise", t, JudgeView(show_source=False)))
    assert [id(x) for x in no_src] == [id(req.edited), id(req.other)]
    cropped = build_conversation(req, "score", t, JudgeView(crop=True, crop_size=32, crop_margin=0.0))
    imgs = conversation_images(cropped)
    assert len(imgs) == 3 and imgs[2].shape == (3, 32, 32)
    assert "close-up of the edited region of image 2" in _text(cropped)
    # the crop is a square around the mask's box (20 wide), inside the image
    assert crop_box(req.mask, 0.0) == (5, 30, 20)
    assert torch.allclose(mask_crop(req.edited, req.mask, margin=0.0, size=20), req.edited[:, 5:25, 30:50])
    with pytest.raises(ValueError, match="pairwise mode needs"):
        build_conversation(_request(other=False), "pairwise", t, JudgeView())


def test_crop_keeps_gradients():
    req = _request()
    edited = req.edited.clone().requires_grad_(True)
    mask_crop(edited, req.mask, size=24).sum().backward()
    assert edited.grad[:, req.mask[0] > 0].abs().sum() > 0


def test_templates_are_data_with_checked_keys_and_fields(tmp_path):
    custom = JudgeTemplates.from_config({"system": "Be brief."})
    assert custom.system == "Be brief." and custom.score == JudgeTemplates().score
    with pytest.raises(ValueError, match="unknown judge template key"):
        JudgeTemplates.from_config({"scroe": "typo"})
    with pytest.raises(ValueError, match="unknown placeholder"):
        JudgeTemplates.from_config({"yesno": "Is {dimensoin} fine?"})
    path = tmp_path / "templates.yaml"
    path.write_text('yesno: "{images}Good {dimension_name}? Reply Yes or No."\n')
    conv = build_conversation(_request(dim="structure"), "yesno", JudgeTemplates.from_config(path), JudgeView())
    assert _text(conv).endswith("Good structure? Reply Yes or No.")
    with pytest.raises(ValueError, match="crop_margin"):
        JudgeView(crop_margin=-1)


@given(h=st.integers(4, 40), w=st.integers(4, 40), data=st.data(), margin=st.floats(0, 1))
def test_crop_box_is_a_square_inside_the_image_around_the_mask(h, w, data, margin):
    top = data.draw(st.integers(0, h - 1))
    left = data.draw(st.integers(0, w - 1))
    bottom = data.draw(st.integers(top + 1, h))
    right = data.draw(st.integers(left + 1, w))
    mask = torch.zeros(1, h, w)
    mask[:, top:bottom, left:right] = 1
    y0, x0, side = crop_box(mask, margin)
    assert 0 <= y0 and y0 + side <= h and 0 <= x0 and x0 + side <= w
    longest = max(bottom - top, right - left)
    assert side == min(round(longest * (1 + 2 * margin)), h, w)
    if side >= longest:   # the box is covered along its longer side
        if bottom - top == longest:
            assert y0 <= top and bottom <= y0 + side
        else:
            assert x0 <= left and right <= x0 + side
