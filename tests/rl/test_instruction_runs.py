"""Instruction editors (no mask) after training: `python -m rl.edit` and rl.edit's Python API on a
toy FLUX.1 Kontext-style run, and the run's model card."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rl.train
from core.io.image_io import to_pil
from core.synthetic.instruction_world import InstructionWorld
from rl.edit import EditError, edit, load_editor, main
from rl.evaluation.model_card import model_card
from rl.plumbing.config import ModelConfig, RunConfig, load_config

REPO = Path(__file__).resolve().parents[2]
PROMPT = "make the red circle blue"


@pytest.fixture(scope="session")
def toy_kontext_dir():
    """The shipped toy instruction editor (a FluxKontextPipeline directory, core/assets/toy_kontext)."""
    from core.toy_flux import shipped_kontext_dir

    return shipped_kontext_dir()


@pytest.fixture(scope="module")
def instruction_run(tmp_path_factory):
    """A one-step DiffusionNFT run of the shipped configs/tiny_edit_nft.yaml on the shipped toy
    instruction editor (model.path null), with a held-out evaluation."""
    overrides = {"model.device": "cpu", "nft.groups_per_step": 2,
                 "nft.group_size": 4, "sampler.steps": 2, "sampler.eval_steps": 2, "train.steps": 1,
                 "train.eval_per_task": 1, "train.sample_every": 0, "train.checkpoint_every": 1,
                 "train.progress": False, "train.tensorboard": False}
    cfg = load_config(str(REPO / "configs" / "tiny_edit_nft.yaml"), [f"{k}={v}" for k, v in overrides.items()])
    run_dir = tmp_path_factory.mktemp("instruction_run") / "run"
    summary = rl.train.run(cfg, out_dir=run_dir)
    return run_dir, summary


def _source(folder: Path, size=(64, 64), name="in") -> tuple[Path, np.ndarray]:
    """An instruction-world source image (resized to `size`) as a PNG."""
    sample = InstructionWorld(size=64, seed=0).sample("recolour", 0, "heldout")
    img = to_pil(sample.source).resize(size[::-1])
    folder.mkdir(parents=True, exist_ok=True)
    img.save(folder / f"{name}.png")
    return folder / f"{name}.png", np.asarray(img)


def test_cli_and_api_edit_without_a_mask(instruction_run, tmp_path):
    run_dir, _ = instruction_run
    image, _ = _source(tmp_path)
    out = tmp_path / "out" / "edit.png"
    assert main(["--model", str(run_dir), "--image", str(image), "--prompt", PROMPT, "--out", str(out),
                 "--device", "cpu", "--seed", "3"]) == 0
    result = np.asarray(Image.open(out))
    assert result.shape == (64, 64, 3)

    # the Python API: masks=None, the same edit as the command line's
    editor = load_editor(run_dir, "cpu")
    assert editor.instruction and (editor.method, editor.steps, editor.size) == ("dpm2", 2, (64, 64))
    [same] = editor.edit(image, None, PROMPT, seed=3)
    assert np.array_equal(np.asarray(same), result)
    [by_spec] = edit(str(run_dir), [image], None, [PROMPT], seed=3, device="cpu")
    assert np.array_equal(np.asarray(by_spec), result)
    # an instruction task may be named; it changes nothing
    [named] = editor.edit([image], None, [PROMPT], task="recolour", seed=3)
    assert np.array_equal(np.asarray(named), result)
    # a batch of tensors, one prompt each; every image is regenerated
    src = torch.from_numpy(result.copy()).permute(2, 0, 1).float() / 255
    outs = editor.edit([src, src], None, [PROMPT, "remove the green triangle"], seed=[0, 1])
    assert [o.size for o in outs] == [(64, 64), (64, 64)]

    # --keep-size: the output resized back to the input's size (nothing is pasted back)
    big, _ = _source(tmp_path, size=(80, 96), name="big")
    kept = tmp_path / "kept.png"
    assert main(["--model", str(run_dir), "--image", str(big), "--prompt", PROMPT, "--out", str(kept),
                 "--device", "cpu", "--keep-size"]) == 0
    assert np.asarray(Image.open(kept)).shape == (80, 96, 3)
    [small] = editor.edit(big, None, PROMPT)
    assert small.size == (64, 64)
    [resized] = editor.edit(big, None, PROMPT, keep_size=True)
    assert np.array_equal(np.asarray(resized), np.asarray(Image.open(kept)))


def test_instruction_errors(instruction_run, tmp_path, capsys):
    run_dir, _ = instruction_run
    image, _ = _source(tmp_path)
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(tmp_path / "mask.png")
    base = ["--model", str(run_dir), "--device", "cpu", "--image", str(image), "--out", str(tmp_path / "o.png")]
    cases = {
        "mask given": (base + ["--mask", str(tmp_path / "mask.png"), "--prompt", PROMPT],
                       "instruction editors take no mask"),
        "no prompt": (base, "an instruction editor needs a prompt"),
        "blank prompt": (base + ["--prompt", "  "], "--prompt \"make the red circle blue\""),
        "mask-guided task": (base + ["--prompt", PROMPT, "--task", "fill"], "is a mask-guided task"),
        "unknown task": (base + ["--prompt", PROMPT, "--task", "paint"], "unknown task 'paint'"),
        "unknown words": (base + ["--prompt", "make the red zebra blue"], "outside the toy model's vocabulary"),
        "no output": (["--model", str(run_dir), "--image", str(image), "--prompt", PROMPT],
                      "missing --out: give --image and --out"),
    }
    for name, (argv, message) in cases.items():
        assert main(argv) == 2, name
        err = capsys.readouterr().err
        assert err.count("rl.edit: error: ") == 1, (name, err)
        line = err.split("\n")[-2]
        assert line.startswith("rl.edit: error: ") and message in line, (name, err)
    assert not (tmp_path / "o.png").exists()

    editor = load_editor(run_dir, "cpu")
    with pytest.raises(EditError, match="instruction editors take no mask"):
        editor.edit(image, tmp_path / "mask.png", PROMPT)
    with pytest.raises(EditError, match="needs a prompt"):
        editor.edit([image, image], None, [PROMPT, None])
    with pytest.raises(EditError, match="outside the toy model's vocabulary"):
        editor.edit(image, None, "a zebra")


def test_model_directory_and_base_with_config(toy_kontext_dir, tmp_path):
    image, _ = _source(tmp_path)
    # a FluxKontextPipeline directory is an instruction editor without any config
    editor = load_editor(toy_kontext_dir, "cpu", steps=2)
    assert editor.instruction and editor.size == (64, 64)
    [a] = editor.edit(image, None, PROMPT)
    assert a.size == (64, 64)
    out = tmp_path / "dir.png"
    assert main(["--model", str(toy_kontext_dir), "--image", str(image), "--prompt", PROMPT, "--out", str(out),
                 "--steps", "2", "--device", "cpu"]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(a))

    # `base` with a config naming the instruction kind: the same model
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model:\n  kind: tiny_kontext\n  path: {toy_kontext_dir}\n"
                   "data:\n  mixture: {recolour: 1.0}\nsampler:\n  eval_steps: 2\n")
    out = tmp_path / "base.png"
    assert main(["--model", "base", "--config", str(cfg), "--image", str(image), "--prompt", PROMPT,
                 "--out", str(out), "--device", "cpu"]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(a))


def test_batch_mode_records_without_masks(instruction_run, tmp_path, capsys):
    run_dir, _ = instruction_run
    data = tmp_path / "data"
    _source(data, name="p")
    _source(data, size=(80, 96), name="q")
    records = [{"image": "p.png", "prompt": PROMPT},
               {"image": "q.png", "prompt": "remove the green triangle", "task": "remove_named", "seed": 5}]
    jsonl = data / "edits.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    out_dir = tmp_path / "edits"
    assert main(["--model", str(run_dir), "--jsonl", str(jsonl), "--out-dir", str(out_dir), "--device", "cpu",
                 "--keep-size"]) == 0
    rows = [json.loads(x) for x in (out_dir / "results.jsonl").read_text().splitlines()]
    assert [r["output"] for r in rows] == ["00001.png", "00002.png"]
    assert all("mask" not in r for r in rows)
    assert "task" not in rows[0] and rows[1]["task"] == "remove_named" and rows[1]["seed"] == 5
    assert [r["size"] for r in rows] == [[64, 64], [80, 96]]
    editor = load_editor(run_dir, "cpu")
    [alone] = editor.edit(data / "q.png", None, "remove the green triangle", seed=5, keep_size=True)
    assert np.array_equal(np.asarray(Image.open(out_dir / "00002.png")), np.asarray(alone))

    # a record with a mask, one without a prompt, a mask-guided task: each listed, nothing written
    bad = [{"image": "p.png", "mask": "p.png", "prompt": PROMPT}, {"image": "p.png"},
           {"image": "p.png", "prompt": PROMPT, "task": "removal"}]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in bad))
    assert main(["--model", str(run_dir), "--jsonl", str(jsonl), "--out-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "3 bad records" in err
    for text in (":1: instruction editors take no mask", ":2: an instruction editor needs a prompt",
                 ":3: task 'removal' is a mask-guided task"):
        assert text in err, text
    assert not (tmp_path / "o").exists()


def test_model_card_of_an_instruction_run(instruction_run):
    run_dir, summary = instruction_run
    card = (run_dir / "final" / "README.md").read_text()
    for text in ("FluxKontextPipeline.from_pretrained", "from diffusers import FluxKontextPipeline",
                 "max_area=64 * 64, _auto_resize=False, max_sequence_length=16", "guidance_scale=2.5",
                 f'python -m rl.edit --model {run_dir} --image in.png --prompt "make the red circle blue" --out',
                 "## With diffusers' FluxKontextPipeline", "the shipped toy instruction editor", "## Held-out results",
                 f"{summary['reward_final']:.3f}", "INSTRUCTION_VOCABULARY"):
        assert text in card, text
    for text in ("mask_image", "--mask", "FluxFillPipeline", "guidance_scale=30"):
        assert text not in card, text
    for task in ("recolour", "remove_named", "add", "retext", "restyle"):
        assert f"| {task} | {summary['by_task'][task]['base']:.3f} |" in card


def test_model_cards_of_other_instruction_kinds():
    shipped = RunConfig(model=ModelConfig(kind="tiny_kontext"))
    card = model_card(Path("runs/r/final"), shipped, {"run_dir": "runs/r", "steps": 1})
    assert "fine-tune of the shipped toy instruction editor" in card
    assert "mask_image" not in card and "FluxKontextPipeline" in card

    kontext = RunConfig(model=ModelConfig(kind="flux_kontext", path="black-forest-labs/FLUX.1-Kontext-dev",
                                       dtype="bfloat16", guidance=3.0, lora=None))
    card = model_card(Path("runs/k/final"), kontext, {"run_dir": "runs/k", "steps": 1})
    assert 'FluxKontextPipeline.from_pretrained("runs/k/final", torch_dtype=torch.bfloat16)' in card
    assert "guidance_scale=3" in card and "max_sequence_length=16" not in card and "mask_image" not in card

    qwen = RunConfig(model=ModelConfig(kind="qwen_image_edit", path="Qwen/Qwen-Image-Edit"))
    card = model_card(Path("runs/q/final"), qwen, {"run_dir": "runs/q", "steps": 1})
    for text in ("Qwen-Image-Edit (`Qwen/Qwen-Image-Edit`)", "QwenImageEditPipeline.from_pretrained",
                 "true_cfg_scale=1", "## With diffusers' QwenImageEditPipeline"):
        assert text in card, text
    assert "mask_image" not in card and "guidance_scale" not in card and "FluxKontextPipeline" not in card


def test_rl_eval_reports_instruction_tasks_with_their_ground_truth(instruction_run, tmp_path):
    import rl.eval

    run_dir, summary = instruction_run
    out = tmp_path / "report"
    assert rl.eval.main(["--model", str(run_dir), "--against", "base", "--per-task", "1", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    tasks = {t for t, w in load_config(str(REPO / "configs" / "tiny_edit_nft.yaml")).data.mixture.items() if w > 0}
    assert set(report["gsb"]) == tasks and tasks <= {"recolour", "remove_named", "add", "retext", "restyle"}
    # the run's own summary and the report carry each task's main ground truth and psnr_keep
    truth = summary["ground_truth"]["final"]
    assert {"colour_acc", "psnr_keep"} <= set(truth["recolour"]) and "position_acc" in truth["add"]
    assert "psnr_keep" in json.dumps(report)
