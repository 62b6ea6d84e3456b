"""`python -m rl.edit` and rl.edit's Python API on a small random toy FLUX.1 Fill (trained VAE); the run's model card."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rl.train
from core.io.image_io import to_pil
from core.masks import dilate
from core.policies.flux_fill import FluxFillPolicy
from core.synthetic.world import SyntheticWorld
from rl.edit import NOISE_KEY, EditError, edit, load_editor, main
from rl.evaluation.heldout import generate_images
from rl.evaluation.model_card import model_card
from rl.plumbing.builders import rollout_sigmas
from rl.plumbing.config import LoraConfig, ModelConfig, RunConfig, load_config
from rl.plumbing.model_ref import resolve_model

REPO = Path(__file__).resolve().parents[2]


def _write_pair(folder: Path, size=(64, 64), box=(16, 16, 40, 44), name="a"):
    """A random RGB PNG and a box mask PNG (white = generate); returns their paths and arrays."""
    h, w = size
    rgb = np.random.default_rng(sum(map(ord, name))).integers(0, 256, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), dtype=np.uint8)
    top, left, bottom, right = box
    mask[top:bottom, left:right] = 255
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(folder / f"{name}.png")
    Image.fromarray(mask).save(folder / f"{name}_mask.png")
    return folder / f"{name}.png", folder / f"{name}_mask.png", rgb, mask > 127


@pytest.fixture(scope="module")
def editor(tiny_model_dir):
    return load_editor(tiny_model_dir, "cpu")


def test_cli_single_image_keeps_the_known_region(tiny_model_dir, tmp_path):
    image, mask, rgb, inside = _write_pair(tmp_path)
    out = tmp_path / "out" / "edit.png"
    assert main(["--model", str(tiny_model_dir), "--image", str(image), "--mask", str(mask),
                 "--prompt", "a red circle", "--out", str(out), "--device", "cpu", "--seed", "3"]) == 0
    result = np.asarray(Image.open(out))
    assert result.shape == (64, 64, 3)
    # blending puts the source's latents back exactly at t = 0, so outside the mask the output is the
    # VAE's round trip of the source, up to the decoder's reach into the generated latents next to it
    # (measured: mean 8-bit error 1.5 from 4 px off the mask, 24 inside it)
    policy = FluxFillPolicy.from_pretrained(tiny_model_dir)
    src = torch.from_numpy(rgb).permute(2, 0, 1).float()[None] / 255
    m = torch.from_numpy(inside).float()[None, None]
    cond = policy.encode(src, m, ["a red circle"])
    round_trip = (policy.decode(cond.x0_known, cond)[0].permute(1, 2, 0).numpy() * 255).round()
    far = ~dilate(m[0], 4)[0].bool().numpy()
    error = np.abs(result.astype(float) - round_trip)
    assert error[far].mean() < 3 and error[inside].mean() > 10

    # a larger input: edited at 64x64; --keep-size writes the input's size with its own pixels kept
    image, mask, rgb, inside = _write_pair(tmp_path, size=(96, 128), box=(20, 30, 70, 90), name="big")
    small, big = tmp_path / "small.png", tmp_path / "big_out.png"
    args = ["--model", str(tiny_model_dir), "--image", str(image), "--mask", str(mask), "--task", "removal",
            "--device", "cpu"]
    assert main(args + ["--out", str(small)]) == 0
    assert main(args + ["--out", str(big), "--keep-size"]) == 0
    assert Image.open(small).size == (64, 64)
    kept = np.asarray(Image.open(big))
    assert kept.shape == (96, 128, 3)
    assert np.array_equal(kept[~inside], rgb[~inside])


def test_module_entry_point(tiny_model_dir, tmp_path):
    image, mask, _, _ = _write_pair(tmp_path)
    out = tmp_path / "o.png"
    proc = subprocess.run([sys.executable, "-m", "rl.edit", "--model", str(tiny_model_dir), "--image", str(image),
                           "--mask", str(mask), "--task", "extend", "--steps", "2", "--sampler", "euler",
                           "--device", "cpu", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "euler, 2 steps" in proc.stdout
    assert Image.open(out).size == (64, 64)


def test_run_directory_defaults_match_evaluation_and_card(quick, tmp_path):
    run_dir = tmp_path / "run"
    cfg = load_config(None, quick(**{"train.steps": 1, "train.eval_per_task": 1}))
    summary = rl.train.run(cfg, out_dir=run_dir)

    card = (run_dir / "final" / "README.md").read_text()
    for text in ("DiffusionNFT", "`nft`", "## Held-out results", "| **all** |", f"{summary['reward_final']:.3f}",
                 "FluxFillPipeline.from_pretrained", f"python -m rl.edit --model {run_dir}", "world seed 0",
                 "rule judge", "Ground-truth metrics"):
        assert text in card, text
    for task in ("fill", "extend", "removal", "text"):
        assert f"| {task} | {summary['by_task'][task]['base']:.3f} |" in card

    # the editor samples as evaluation does: the run's sampler, eval steps and shift
    ed = load_editor(run_dir, "cpu")
    assert (ed.method, ed.steps, ed.shift, ed.size) == ("dpm2", 4, None, (64, 64))
    assert "final" in ed.description

    image, mask, _, _ = _write_pair(tmp_path)
    out = tmp_path / "out.png"
    assert main(["--model", str(run_dir), "--image", str(image), "--mask", str(mask), "--prompt", "a blue square",
                 "--seed", "7", "--out", str(out)]) == 0
    policy, weights, _ = resolve_model(str(run_dir), torch.device("cpu"), cfg.model, cfg.data.image_size)
    [prepared] = ed.prepare([image], [mask], ["a blue square"])
    from core.synthetic.world import EditSample

    sample = EditSample(NOISE_KEY, "fill", prepared.image, prepared.mask, "a blue square", None, {})
    expected = generate_images(policy, [sample], weights=weights, sigmas=rollout_sigmas(policy, 4, None),
                               method="dpm2", seed=7, device=torch.device("cpu"))
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(to_pil(expected[0])))


def test_batch_mode_over_jsonl(tiny_model_dir, editor, tmp_path):
    data = tmp_path / "data"
    pairs = [_write_pair(data / "img", name=n) for n in ("p", "q", "r")]
    records = [
        {"image": "img/p.png", "mask": "img/p_mask.png", "task": "fill", "prompt": "a green diamond"},
        {"image": "img/q.png", "mask": "img/q_mask.png", "task": "removal", "seed": 5, "split": "heldout"},
        {"image": "img/r.png", "mask": "img/r_mask.png", "task": "text", "prompt": 'the text "42"'},
    ]
    jsonl = data / "edits.jsonl"
    jsonl.write_text(json.dumps(records[0]) + "\n\n" + "\n".join(json.dumps(r) for r in records[1:]) + "\n")
    out_dir = tmp_path / "edits"
    assert main(["--model", str(tiny_model_dir), "--jsonl", str(jsonl), "--out-dir", str(out_dir),
                 "--device", "cpu", "--batch-size", "2"]) == 0
    rows = [json.loads(x) for x in (out_dir / "results.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rows] == [1, 3, 4]
    assert [r["output"] for r in rows] == ["00001.png", "00003.png", "00004.png"]
    assert [r["seed"] for r in rows] == [0, 5, 0]
    assert rows[1]["prompt"].startswith("remove the object")
    assert rows[0]["sampler"] == "dpm2" and rows[0]["steps"] == 8
    # each record's output is what a single edit with its seed gives: noise does not depend on the batch
    for (image, mask, _, _), rec, row in zip(pairs, records, rows):
        [alone] = editor.edit(image, mask, rec.get("prompt"), task=rec["task"], seed=rec.get("seed", 0))
        assert np.array_equal(np.asarray(Image.open(out_dir / row["output"])), np.asarray(alone))


def test_python_api_is_deterministic_and_equals_generate_images(editor, tiny_model_dir):
    world = SyntheticWorld(size=64, seed=0)
    samples = world.held_out("fill", 2) + world.held_out("text", 1)
    images, masks, prompts = [s.source for s in samples], [s.mask for s in samples], [s.prompt for s in samples]
    tasks = [s.task for s in samples]

    first = editor.edit(images, masks, prompts, task=tasks, seed=11)
    again = edit(editor, images, masks, prompts, task=tasks, seed=11)
    other = editor.edit(images, masks, prompts, task=tasks, seed=12)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, again))
    assert not np.array_equal(np.asarray(first[0]), np.asarray(other[0]))

    # with the held-out key as the noise key, an edit is exactly rl.evaluation.heldout's image of that condition
    expected = generate_images(editor.policy, samples, weights=None, sigmas=rollout_sigmas(editor.policy, 8, None),
                               method="dpm2", seed=12345, device=torch.device("cpu"))
    keyed = editor.edit(images, masks, prompts, task=tasks, seed=12345, noise_keys=[s.key for s in samples])
    for got, want in zip(keyed, expected):
        assert np.array_equal(np.asarray(got), np.asarray(to_pil(want)))

    # PIL inputs are the same edit as the equivalent 8-bit tensors; a model spec loads the model itself
    pil = [to_pil(s.source) for s in samples[:1]]
    by_spec = edit(str(tiny_model_dir), pil, [to_pil(samples[0].mask)], prompts[:1], seed=1, device="cpu")
    quantised = [torch.from_numpy(np.array(p)).permute(2, 0, 1).float() / 255 for p in pil]
    by_tensor = editor.edit(quantised, masks[:1], prompts[:1], seed=1)
    assert np.array_equal(np.asarray(by_spec[0]), np.asarray(by_tensor[0]))

    # a mask-guided model refuses a missing mask and instruction tasks (instruction editors: test_instruction_runs.py)
    assert not editor.instruction
    with pytest.raises(EditError, match="this model is mask-guided and needs a mask"):
        editor.edit(images[0], None, prompts[0])
    with pytest.raises(EditError, match="image 1: this model is mask-guided and needs a mask"):
        editor.edit(images[:2], [masks[0], None], prompts[:2])
    with pytest.raises(EditError, match="'add' is an instruction task"):
        editor.edit(images[0], masks[0], "a red circle", task="add")
    with pytest.raises(EditError, match="2 prompts for 3 images"):
        editor.edit(images, masks, prompts[:2])
    with pytest.raises(EditError, match="steps must be a positive integer"):
        editor.edit(images, masks, prompts, steps=0)


def _bad_cases(tmp_path: Path, model: str):
    image, mask, _, _ = _write_pair(tmp_path)
    wide = tmp_path / "wide_mask.png"
    Image.fromarray(np.full((64, 80), 255, np.uint8)).save(wide)
    empty = tmp_path / "empty_mask.png"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(empty)
    big, _, _, _ = _write_pair(tmp_path, size=(128, 128), name="big")
    thin = np.zeros((128, 128), np.uint8)
    thin[1, :] = 255  # nearest-neighbour resizing to 64 keeps the even rows only
    thin_mask = tmp_path / "thin.png"
    Image.fromarray(thin).save(thin_mask)
    base = ["--model", model, "--device", "cpu", "--out", str(tmp_path / "o.png")]
    ok = ["--image", str(image), "--mask", str(mask), "--prompt", "a red circle"]
    return {
        "missing image": (base + ["--image", str(tmp_path / "nope.png"), "--mask", str(mask), "--prompt", "x"],
                          "image file not found"),
        "mask size": (base + ["--image", str(image), "--mask", str(wide), "--prompt", "x"],
                      "give the mask the image's size"),
        "empty mask": (base + ["--image", str(image), "--mask", str(empty), "--prompt", "x"], "nothing to edit"),
        "empty after resize": (base + ["--image", str(big), "--mask", str(thin_mask), "--prompt", "x"],
                               "empty after resizing"),
        "unknown task": (base + ok + ["--task", "paint"], "unknown task 'paint'"),
        "no mask": (base + ["--image", str(image), "--prompt", "a red circle"], "missing --mask"),
        "instruction task": (base + ok + ["--task", "recolour"], "'recolour' is an instruction task"),
        "no prompt": (base + ["--image", str(image), "--mask", str(mask), "--task", "text"], "needs a prompt"),
        "bad steps": (base + ok + ["--steps", "0"], "steps must be a positive integer"),
        "bad sampler": (base + ok + ["--sampler", "heun"], "unknown sampler"),
        "unknown words": (base + ["--image", str(image), "--mask", str(mask), "--prompt", "a zebra"],
                          "outside the toy model's vocabulary"),
        "missing model": (["--model", str(tmp_path / "no_model"), "--out", str(tmp_path / "o.png")] + ok,
                          "not found"),
        "no output": (["--model", model] + ok, "missing --out"),
    }


def test_bad_input_exits_2_with_one_line(tiny_model_dir, tmp_path, capsys):
    for name, (argv, message) in _bad_cases(tmp_path, str(tiny_model_dir)).items():
        assert main(argv) == 2, name
        err = capsys.readouterr().err  # may hold the model loader's progress bar, drawn with \r
        assert err.count("rl.edit: error: ") == 1 and err.endswith("\n"), (name, err)
        line = err.split("\n")[-2]
        assert line.startswith("rl.edit: error: ") and message in line, (name, err)
    assert not (tmp_path / "o.png").exists()


def test_bad_jsonl_lists_every_bad_record(tiny_model_dir, tmp_path, capsys):
    _write_pair(tmp_path)
    lines = [{"image": "a.png", "mask": "a_mask.png", "prompt": "x"},
             {"image": "a.png", "task": "fill", "prompt": "x"},
             {"image": "gone.png", "mask": "a_mask.png", "task": "removal"},
             {"image": "a.png", "mask": "a_mask.png", "task": "fill"}]
    jsonl = tmp_path / "r.jsonl"
    jsonl.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    assert main(["--model", str(tiny_model_dir), "--jsonl", str(jsonl), "--out-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "4 bad records" in err
    for text in (":2: record lacks mask", ":3: image file not found", ":4: a fill edit needs a prompt",
                 ":5: not valid JSON"):
        assert text in err, text
    assert not (tmp_path / "o").exists()


def test_model_card_of_a_flux_lora_run_without_evaluation():
    cfg = RunConfig(model=ModelConfig(kind="flux_fill", path="black-forest-labs/FLUX.1-Fill-dev", dtype="bfloat16",
                                      lora=LoraConfig()))
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, algorithm="refl"))
    card = model_card(Path("runs/r/final"), cfg, {"run_dir": "runs/r", "steps": 10})
    for text in ("ReFL", "pipe.load_lora_weights(\"runs/r/final\")", "No held-out evaluation",
                 "never blends", "50 steps by default", "DPM-Solver++(2M)", "LoRA adapter, r=32"):
        assert text in card, text
