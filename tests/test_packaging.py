"""Packaging: our import name `kernels` is also a Hugging Face package that diffusers and
transformers probe for (hub kernels, versions [0.18.2, 0.19)). Our distribution is "onejudge"
0.1.0, so their probes must answer False, and `import kernels` must stay ours."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import importlib.metadata as md, json, sys
import diffusers.utils.import_utils as diffusers_utils
import transformers.utils.import_utils as transformers_utils
report = {"diffusers": diffusers_utils.is_kernels_available(),
          "transformers": transformers_utils.is_kernels_available()}
import kernels
report["kernels_file"] = kernels.__file__
report["has_our_api"] = all(hasattr(kernels, n) for n in ("nft_loss", "group_rewards", "masked_blend_step"))
report["distributions"] = md.packages_distributions().get("kernels", [])
try:
    md.version("kernels")
    report["kernels_dist"] = True
except md.PackageNotFoundError:
    report["kernels_dist"] = False
dist = md.distribution("onejudge")
report["name"], report["version"] = dist.metadata["Name"], dist.version
for package in ("core", "kernels", "reward", "rl"):
    __import__(package)
report["imported"] = sorted(p for p in ("core", "kernels", "reward", "rl") if p in sys.modules)
print(json.dumps(report))
"""


def test_hugging_face_probes_do_not_take_our_kernels_for_theirs(tmp_path):
    # a fresh interpreter, so that no probe result is cached; outside the checkout, so the
    # installed package is what gets imported
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["diffusers"] is False and report["transformers"] is False
    assert report["has_our_api"] and Path(report["kernels_file"]).resolve().parent == ROOT / "kernels"
    assert report["name"] == "onejudge" and report["name"] != "kernels" and report["version"] == "0.1.0"
    assert report["kernels_dist"] is False and report["distributions"] == ["onejudge"] * len(report["distributions"])
    assert report["imported"] == ["core", "kernels", "reward", "rl"]
