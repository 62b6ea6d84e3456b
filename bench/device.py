"""The machine a benchmark runs on: device name, nominal memory bandwidth, library versions."""
from __future__ import annotations

import datetime
import platform
import re

import torch

# Nominal memory bandwidth in GB/s, matched against torch.cuda.get_device_name() (most specific
# first). Vendor datasheet numbers; the achievable fraction is what the benchmark measures.
PEAK_GBPS = [
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),            # "NVIDIA H100 80GB HBM3" is the SXM part
    ("GH200", 4000.0),
    ("H200", 4800.0),
    ("B200", 8000.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),            # the 40 GB parts, SXM4 and PCIe
    ("L40S", 864.0),
    ("L4", 300.0),
    ("A10G", 600.0),
    ("RTX 4090", 1008.0),
    ("RTX 3090", 936.0),
    ("V100", 900.0),
]


def peak_gbps(name: str) -> float | None:
    for key, gbps in PEAK_GBPS:
        if key in name:
            return gbps
    return None


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def describe(device: torch.device, peak_override: float | None = None) -> dict:
    """Name, slug, nominal peak bandwidth (None on CPU or an unknown GPU) and SM count."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = props.name
        return {"name": name, "slug": slug(name), "kind": "cuda", "sm_count": props.multi_processor_count,
                "memory_gb": round(props.total_memory / 2**30, 1),
                "peak_gbps": peak_override or peak_gbps(name)}
    name = platform.processor() or platform.machine()
    return {"name": f"cpu ({name}, {torch.get_num_threads()} threads)", "slug": "cpu", "kind": "cpu",
            "peak_gbps": peak_override}


def versions() -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return {"torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
            "cuda": torch.version.cuda, "date": date}
