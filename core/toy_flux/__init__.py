"""A toy-size, genuine diffusers FluxFillPipeline for the synthetic world (see docs/toy_flux.md).

- `tokenizers`: CLIP and T5 tokenizers built locally over the world's vocabulary;
- `build`: `ToyFluxSpec` and `build_toy_pipeline(spec) -> FluxFillPipeline` (random init);
- `vae_training`: resumable training of its AutoencoderKL on the world's images;
- `state`: pickle-free training state (safetensors + JSON);
- `editor_training`: resumable training of its transformer and text encoders (VAE frozen);
- `measure`: size-versus-speed measurements (`python -m core.toy_flux.measure`).

The built-in editor is the pipeline directory shipped in `SHIPPED_DIR` (`python -m rl.pretrain`
builds it): load it with `FluxFillPipeline.from_pretrained(shipped_model_dir())` or
`core.flux_fill.FluxFillPolicy.from_pretrained(...)`.
"""
from pathlib import Path

from .build import (
                    ClipSpec,
                    SchedulerSpec,
                    T5Spec,
                    ToyFluxSpec,
                    TransformerSpec,
                    VAESpec,
                    build_toy_pipeline,
                    save_toy_pipeline,
)

#: where the built-in model lives (installed with the package: package-data core/assets/**)
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "assets" / "toy_flux"


def shipped_model_dir() -> Path:
    """The shipped toy FLUX.1 Fill directory; FileNotFoundError naming the fix when it is missing."""
    if not (SHIPPED_DIR / "model_index.json").is_file():
        raise FileNotFoundError(f"the built-in model is missing from {SHIPPED_DIR}: reinstall the package, or "
                                f"rebuild it with `python -m rl.pretrain --out {SHIPPED_DIR}`")
    return SHIPPED_DIR


__all__ = [
    "SHIPPED_DIR",
    "ClipSpec",
    "SchedulerSpec",
    "T5Spec",
    "ToyFluxSpec",
    "TransformerSpec",
    "VAESpec",
    "build_toy_pipeline",
    "save_toy_pipeline",
    "shipped_model_dir",
]
