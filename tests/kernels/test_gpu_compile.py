"""The GPU code path without a GPU: every kernel compiles ahead of time to an H100 (sm_90) cubin
with the triton wheel's own ptxas, without register spills, and the streaming kernels use 16-byte
vector loads and stores. (On a GPU machine the CUDA tests run the kernels for real.)

Runs in a subprocess: the kernels must be imported with the interpreter off."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import importlib, json, os, re, subprocess, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

mods = {m: importlib.import_module(f"kernels.{m}") for m in ("nft_loss", "masked_blend", "group_rewards",
                                                               "grpo_loss")}
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
POINTERS = {"ws_ptr": "*fp64", "keep_ptr": "*i8", "m_ptr": "*fp32", "r_ptr": "*fp32", "t_ptr": "*fp32",
            "tn_ptr": "*fp32", "w_ptr": "*fp32"}
ACC_POINTERS = ("params_ptr", "go_ptr", "out_ptr", "r_ptr", "adv_ptr", "mean_ptr", "std_ptr")
# the launchers' own choices at FLUX scale on an H100 (8 samples of 4096 x 64, 132 SMs)
FIN = mods["nft_loss"].finalize_tile(8, 66, __import__("torch").device("cuda"))


def compile_one(module, name, data, const, num_warps):
    fn = getattr(mods[module], name)
    acc = "fp64" if const["ACC"] == "fp64" else "fp32"
    const = dict(const, ACC=tl.float64 if acc == "fp64" else tl.float32)
    sig, attrs = {}, {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            group = module == "group_rewards" and p.name in ACC_POINTERS
            is_acc = p.name in ACC_POINTERS and (group or p.name != "r_ptr")
            sig[p.name] = "*" + acc if is_acc else POINTERS.get(p.name, "*" + data)
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[p.name] = "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]  # FLUX sizes are multiples of 16
    k = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": num_warps})
    path = os.path.join(sys.argv[1], name + ".cubin")
    with open(path, "wb") as f:
        f.write(k.asm["cubin"])
    usage = subprocess.run([os.path.join(BIN, "cuobjdump"), "--dump-resource-usage", path],
                           capture_output=True, text=True, check=True).stdout
    ptx = k.asm["ptx"]
    return {"kernel": f"{name} {data}", "regs": int(re.search(r"REG:(\d+)", usage).group(1)),
            "stack": int(re.search(r"STACK:(\d+)", usage).group(1)),
            # 16-byte accesses: v4 x 32 bit, or v2 x 64 bit for fp64
            "v4_loads": bool(re.search(r"ld\.global\.(v4|v2\.b64)", ptx)),
            "v4_stores": bool(re.search(r"st\.global\.(v4|v2\.b64)", ptx))}


NFT, BLEND = dict(ACC="fp32", ROWS=1, BLOCK=2048), dict(ACC="fp32", BLOCK_R=32, BLOCK_C=64)
CASES = [
    ("nft_loss", "_nft_forward_kernel", "fp32", dict(NFT, ADAPTIVE=True, HAS_REF=True, WRITE_GRAD=False), 8),
    ("nft_loss", "_nft_forward_kernel", "bf16", dict(NFT, ADAPTIVE=False, HAS_REF=True, WRITE_GRAD=True), 8),
    ("nft_loss", "_nft_finalize_kernel", "fp32",
     dict(ADAPTIVE=True, HAS_REF=True, HAS_WEIGHT=True, MEAN=True, ACC="fp32", FIN_B=FIN[0], FIN_C=FIN[1]), 4),
    ("nft_loss", "_nft_backward_kernel", "bf16",
     dict(NFT, FROM_SAVED=False, HAS_REF=True, HAS_WEIGHT=True, MEAN=True), 8),
    ("nft_loss", "_nft_backward_kernel", "fp64",
     dict(NFT, FROM_SAVED=True, HAS_REF=False, HAS_WEIGHT=False, MEAN=False, ACC="fp64"), 8),
    ("masked_blend", "_blend_forward_kernel", "bf16",
     dict(BLEND, M_COL=False, HAS_RM=False, T_ROWS=True, TN_ROWS=True), 4),
    ("masked_blend", "_blend_backward_kernel", "fp32",
     dict(BLEND, M_COL=True, HAS_RM=True, T_ROWS=False, TN_ROWS=True, NEED_X=True, NEED_V=True, NEED_X0=True,
          NEED_N=True, BLOCK_R=2, BLOCK_C=1024), 4),
    ("group_rewards", "_group_rewards_kernel", "fp32",
     dict(GLOBAL=True, FILTER=1, HAS_WD=True, ACC="fp32", BLOCK_G=64, BLOCK_S=32, BLOCK_D=4), 4),
    ("grpo_loss", "_grpo_forward_kernel", "bf16", dict(NFT, HAS_MASK=True, HAS_REF=True, WRITE=2), 8),
    ("grpo_loss", "_grpo_finalize_kernel", "fp32", dict(HAS_MASK=True, HAS_REF=True, ON_POLICY=False,
     HAS_WEIGHT=True, MEAN=True, ACC="fp32", FIN_B=FIN[0], FIN_C=FIN[1]), 4),
    ("grpo_loss", "_grpo_backward_kernel", "bf16", dict(NFT, SPLIT=True, HAS_REF=True, HAS_WEIGHT=True, MEAN=True), 8),
    ("grpo_loss", "_grpo_finalize_kernel", "fp64", dict(HAS_MASK=False, HAS_REF=False, ON_POLICY=True,
     HAS_WEIGHT=False, MEAN=False, ACC="fp64", FIN_B=FIN[0], FIN_C=FIN[1]), 4),  # fp64 log and exp
]
print(json.dumps([compile_one(*case) for case in CASES]))
"""


def _nvidia_backend_available() -> bool:
    try:
        import triton
    except ImportError:
        return False
    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the kernels for real (tests marked cuda)")
@pytest.mark.skipif(not _nvidia_backend_available(), reason="this triton has no NVIDIA backend / ptxas")
def test_kernels_compile_for_h100_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is the current default
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(report) == 12
    for k in report:
        assert k["stack"] == 0, f"{k['kernel']} spills registers: {k}"
        assert k["regs"] <= 168, f"{k['kernel']} uses {k['regs']} registers (fewer than 2 programs per SM)"
    # not the finalize and group kernels (a few scalars each)
    streaming = report[:2] + report[3:7] + [report[8], report[10]]
    assert all(k["v4_loads"] for k in streaming), streaming
    writers = streaming[1:]  # the adaptive forward writes no large tensor
    assert all(k["v4_stores"] for k in writers), writers
