import pytest
import torch

from core import masks as M
from core.io.image_io import (
    image_grid,
    load_image,
    load_mask,
    resize_to_multiple,
    save_image,
)


def test_generators_shapes_and_binary():
    g = torch.Generator().manual_seed(0)
    for m in (M.box_mask(32, 40, 4, 5, 10, 12), M.ellipse_mask(32, 40, 16, 20, 6, 9),
              M.brush_mask(32, 40, g), M.outpaint_mask(32, 40, left=0.25, top=0.1),
              M.dilate(M.box_mask(32, 40, 10, 10, 4, 4), 2)):
        assert m.shape == (1, 32, 40) and set(m.unique().tolist()) <= {0.0, 1.0} and m.sum() > 0
    assert M.box_mask(32, 40, 4, 5, 10, 12).sum() == 120
    assert M.dilate(M.box_mask(32, 32, 10, 10, 4, 4), 2).sum() == 64
    assert M.bbox(M.box_mask(32, 40, 4, 5, 10, 12)) == (4, 5, 14, 17)


def test_outpaint_canvas():
    img = torch.rand(3, 20, 40)
    canvas, mask = M.pad_for_outpaint(img, left=0.5, top=0.25)
    assert canvas.shape == (3, 25, 60) and mask.shape == (1, 25, 60)
    assert torch.equal(canvas[:, 5:, 20:], img) and mask[:, 5:, 20:].sum() == 0
    with pytest.raises(ValueError, match="no original image"):
        M.outpaint_mask(10, 10, left=0.6, right=0.5)


def test_validation_errors_name_the_problem():
    img = torch.rand(3, 16, 16)
    with pytest.raises(ValueError, match="single-channel"):
        M.validate_mask(torch.ones(3, 16, 16), img)
    with pytest.raises(ValueError, match="resize the mask"):
        M.validate_mask(torch.ones(1, 8, 8), img)
    with pytest.raises(ValueError, match="not binary"):
        M.validate_mask(torch.rand(1, 16, 16), img)
    with pytest.raises(ValueError, match="nothing to edit"):
        M.validate_mask(torch.zeros(1, 16, 16), img)
    nearly = M.box_mask(16, 16, 2, 2, 6, 6) * 0.99
    assert torch.equal(M.validate_mask(nearly, img), M.box_mask(16, 16, 2, 2, 6, 6))


def test_png_round_trip_and_mask_loading(tmp_path):
    img = torch.rand(3, 24, 32)
    save_image(img, tmp_path / "a.png")
    back = load_image(tmp_path / "a.png")
    assert back.shape == img.shape and (back - img).abs().max() <= 1 / 255 + 1e-6
    save_image(M.box_mask(24, 32, 3, 3, 5, 5), tmp_path / "m.png")
    assert torch.equal(load_mask(tmp_path / "m.png", img), M.box_mask(24, 32, 3, 3, 5, 5))
    save_image(torch.rand(3, 24, 32), tmp_path / "rgb_noise.png")
    with pytest.raises(ValueError, match="not binary"):
        load_mask(tmp_path / "rgb_noise.png")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")


def test_resize_and_grid():
    assert resize_to_multiple(torch.rand(3, 70, 100), 16).shape == (3, 64, 96)
    assert resize_to_multiple(torch.rand(3, 1000, 500), 16, max_side=512).shape == (3, 512, 256)
    grid = image_grid([[torch.rand(3, 8, 8), torch.ones(1, 8, 8)], [torch.zeros(3, 8, 8)]], pad=1)
    assert grid.shape == (3, 19, 19) and grid[:, 1:9, 10:18].min() == 1
