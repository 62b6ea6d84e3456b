"""Readable run outputs: labelled sample grids, per-task reward curves, images in TensorBoard,
the optional Weights & Biases tracker, and quiet model loading."""
import logging
import sys

import numpy as np
import pytest
import torch

import rl.train
from core.config.loading import ConfigError
from core.io.image_io import _font, labeled_grid, wrap_text
from rl.evaluation.plots import (
    OVERALL,
    moving_average,
    plot_reward_curves,
    reward_figure,
    smoothing_window,
)
from rl.plumbing.config import load_config
from rl.plumbing.run_log import (
    WANDB_ID_FILE,
    RunLog,
    image_hwc,
    require_tracker,
    sample_label,
    save_sample_grid,
)


def _batch(n, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, size, size, generator=g), (torch.rand(n, 1, size, size, generator=g) > 0.5).float(),
            {"base": torch.rand(n, 3, size, size, generator=g), "current": torch.rand(n, 3, size, size, generator=g)})


# -- sample grids ------------------------------------------------------------------------------------

def test_labelled_grid_is_upscaled_and_carries_headers_and_row_labels(tmp_path):
    sources, masks, columns = _batch(2)
    long_prompt = 'a sign that says "' + "HELLO WORLD " * 12 + '"'
    plain = save_sample_grid(tmp_path / "plain.png", sources, masks, columns, headers=False)
    labelled = save_sample_grid(tmp_path / "labelled.png", sources, masks, columns,
                                row_labels=[sample_label("fill", "a red circle"), sample_label("text", long_prompt)])
    # 64 px cells become 128 px (nearest): 4 columns and 2 rows of 128 + 2 px padding
    assert plain.shape == (3, 2 * 130 + 2, 4 * 130 + 2)
    assert labelled.shape[2] > plain.shape[2] and labelled.shape[1] > plain.shape[1]
    top, left = labelled.shape[1] - plain.shape[1], labelled.shape[2] - plain.shape[2]
    # the images themselves are unchanged, and the margins hold text (dark pixels on white)
    assert torch.allclose(labelled[:, top:, left:], plain, atol=1 / 255)
    assert labelled[:, :top, left:].min() < 0.5, "no column headers drawn"
    assert labelled[:, top:, :left].min() < 0.5, "no row labels drawn"
    assert not torch.equal(labelled[:, top + 130:, :left], torch.ones_like(labelled[:, top + 130:, :left]))
    # nearest upscaling: each source pixel is a 2x2 block
    cell = plain[:, 2:130, 2:130]
    assert torch.allclose(cell[:, ::2, ::2], sources[0], atol=1 / 255)
    assert torch.equal(cell[:, ::2, ::2], cell[:, 1::2, 1::2])
    from PIL import Image

    assert Image.open(tmp_path / "labelled.png").size == (labelled.shape[2], labelled.shape[1])


def test_long_labels_wrap_within_the_width_and_are_cut_to_the_cell():
    font = _font()
    text = "text\n" + "a sign that says SUPERCALIFRAGILISTICEXPIALIDOCIOUS " * 6
    lines = wrap_text(text, font, 120)
    assert lines[0] == "text" and len(lines) > 3
    assert all(font.getlength(line) <= 120 for line in lines)
    cut = wrap_text(text, font, 120, max_lines=3)
    assert len(cut) == 3 and cut[-1].endswith("...") and font.getlength(cut[-1]) <= 120
    with pytest.raises(ValueError, match="row labels"):
        labeled_grid([[torch.zeros(3, 8, 8)]], row_labels=["a", "b"])


def test_image_forms_for_trackers():
    chw = torch.rand(3, 10, 20)
    hwc = image_hwc(chw)
    assert hwc.shape == (10, 20, 3) and hwc.dtype == np.uint8
    assert np.array_equal(image_hwc(chw.permute(1, 2, 0)), hwc)
    assert image_hwc(torch.rand(1, 10, 20)).shape == (10, 20, 3)
    assert np.array_equal(image_hwc(hwc), hwc)


# -- reward curves -----------------------------------------------------------------------------------

def _metrics(n=40):
    """Two tasks of very different difficulty, sampled alternately: the overall reward jumps with
    the mixture while each task climbs slowly."""
    out = []
    for s in range(n):
        by_task = {"fill": 0.8 + 0.001 * s} if s % 2 else {"text": 0.1 + 0.002 * s}
        m = {"step": s, "reward": next(iter(by_task.values())), "reward_by_task": by_task}
        if s % 10 == 9:
            m["heldout/reward"] = 0.5
            m["heldout/reward_by_task"] = {"fill": 0.85, "text": 0.2}
        out.append(m)
    out[3]["reward"] = None  # a non-finite reward, logged as null
    return out


def test_moving_average_and_window():
    assert moving_average([1, 2, 3, 4, 5], 3) == [1.5, 2, 3, 4, 4.5]
    assert moving_average([2.0], 5) == [2.0]
    assert smoothing_window(10) == 5 and smoothing_window(200) == 20


def test_reward_curves_are_drawn_per_task_with_heldout_markers(tmp_path):
    metrics = _metrics()
    series = plot_reward_curves(metrics, tmp_path / "curve.png", title="nft training reward")
    assert (tmp_path / "curve.png").stat().st_size > 0
    assert set(series) == {"fill", "text", OVERALL}
    steps, smooth = series["text"]
    raw = [0.1 + 0.002 * s for s in range(0, 40, 2)]
    assert steps == list(range(0, 40, 2))
    assert smooth == pytest.approx(moving_average(raw, 5))
    assert len(series[OVERALL][0]) == 39  # the null reward is left out

    fig = reward_figure(metrics, title="nft training reward")
    ax_task, ax_all = fig.axes
    labels = [line.get_label() for line in ax_task.get_lines()]
    assert "fill (mean of 5)" in labels and "text (mean of 5)" in labels
    assert "fill held-out" in labels and "text held-out" in labels
    heldout = next(line for line in ax_task.get_lines() if line.get_label() == "fill held-out")
    assert list(heldout.get_xdata()) == [9, 19, 29, 39] and heldout.get_marker() == "D"
    faint = [line for line in ax_task.get_lines() if line.get_label().startswith("_")]
    assert faint and all(line.get_alpha() < 0.5 for line in faint)
    assert f"{OVERALL} held-out" in [line.get_label() for line in ax_all.get_lines()]
    assert ax_task.get_xlabel() == "step" and ax_task.get_ylabel() and fig._suptitle.get_text()
    import matplotlib.pyplot as plt

    plt.close(fig)
    assert plot_reward_curves([{"step": 0}], tmp_path / "none.png") == {}
    assert not (tmp_path / "none.png").exists()


# -- TensorBoard and Weights & Biases ----------------------------------------------------------------

@pytest.fixture
def offline_wandb(monkeypatch, tmp_path):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var, sub in (("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / sub))


def _wandb_runs(run_dir):
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def test_run_sends_sample_grids_to_tensorboard_and_wandb(quick, tmp_path, offline_wandb):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    cfg = load_config(None, quick(**{"train.sample_every": 1, "train.tensorboard": True, "train.tracker": "wandb"}))
    rl.train.run(cfg, out_dir=run_dir)

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert "samples" in events.Tags()["images"]
    images = events.Images("samples")
    assert [im.step for im in images] == [0, 1]
    png = (run_dir / "samples" / "step-000001.png")
    from PIL import Image

    assert (images[-1].width, images[-1].height) == Image.open(png).size
    assert "reward" in events.Tags()["scalars"]

    run_id = (run_dir / WANDB_ID_FILE).read_text().strip()
    (wandb_run,) = _wandb_runs(run_dir)
    # the offline transaction log holds the logged keys; the grids are written as media files
    history = (wandb_run / f"run-{run_id}.wandb").read_bytes()
    for key in (b"reward_by_task/fill", b"loss", b"images_per_second", b"samples"):
        assert key in history, key
    assert len(list((wandb_run / "files" / "media" / "images").glob("samples_*.png"))) == 2


def test_wandb_resume_continues_the_same_run(tmp_path, offline_wandb):
    config = {"train": {"steps": 3}}
    log = RunLog(tmp_path, tensorboard=False, tracker="wandb", config=config)
    log.log(0, {"reward": 0.5, "reward_by_task": {"fill": 0.5}})
    log.log_images(0, {"samples": torch.rand(3, 16, 24)})
    log.close()
    run_id = (tmp_path / WANDB_ID_FILE).read_text().strip()
    log = RunLog(tmp_path, tensorboard=False, tracker="wandb", config=config, resume_step=0)
    assert log.wandb_run.id == run_id
    log.log(1, {"reward": 0.6})
    log.close()
    runs = _wandb_runs(tmp_path)
    assert len(runs) == 2 and all((r / f"run-{run_id}.wandb").is_file() for r in runs)
    assert (tmp_path / WANDB_ID_FILE).read_text().strip() == run_id


def test_missing_wandb_is_a_clear_config_error(monkeypatch, quick, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'onejudge\[wandb\]'"):
        require_tracker("wandb")
    require_tracker("none")
    with pytest.raises(ConfigError, match="pip install"):
        rl.train.run(load_config(None, quick(**{"train.tracker": "wandb"})), out_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


# -- quiet loading -----------------------------------------------------------------------------------

class _Recorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loading_the_tiny_model_prints_no_noise(tiny_model_dir, capfd, dtype):
    from transformers.utils import logging as hf_logging

    from core.policies.flux_fill import FluxFillPolicy

    # the libraries log through their own handlers, which pytest's capture may not see: listen directly
    recorder = _Recorder()
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers")]
    for lg in loggers:
        lg.addHandler(recorder)
    try:
        policy = FluxFillPolicy.from_pretrained(tiny_model_dir, dtype=dtype)
        assert policy.model.dtype == policy.pipe.text_encoder_2.dtype == dtype
        policy.to(dtype=torch.float32)
        logging.getLogger("diffusers.models.modeling_utils").warning("probe")
    finally:
        for lg in loggers:
            lg.removeHandler(recorder)
    out, err = capfd.readouterr()
    said = "\n".join(recorder.messages) + out + err
    assert "probe" in recorder.messages  # the recorder hears diffusers' warnings
    assert "should be kept in float32" not in said
    assert "Loading weights" not in said and "Loading pipeline components" not in said
    assert policy.model.dtype == torch.float32
    assert hf_logging.is_progress_bar_enabled()  # switched off for the load only
