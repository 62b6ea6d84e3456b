"""A toy-size, genuine diffusers FluxFillPipeline for the synthetic world (see docs/toy_flux.md).

- `tokenizers`: CLIP and T5 tokenizers built locally over the world's vocabulary;
- `build`: `ToyFluxSpec` and `build_toy_pipeline(spec) -> FluxFillPipeline` (random init);
- `vae_training`: resumable training of its AutoencoderKL on the world's images;
- `state`: pickle-free training state (safetensors + JSON);
- `editor_training`: resumable training of its transformer and text encoders (VAE frozen);
- `instruction_training`: the toy instruction editor (FLUX.1 Kontext-style), warm-started from it;
- `measure`: size-versus-speed measurements (`python -m core.toy_flux.measure`).

The built-in editor is the pipeline directory shipped in `SHIPPED_DIR` (`python -m rl.pretrain`
builds it): load it with `FluxFillPipeline.from_pretrained(shipped_model_dir())` or
`core.policies.flux_fill.FluxFillPolicy.from_pretrained(...)`.
"""
from pathlib import Path

from core.toy_flux.build import (
                    ClipSpec,
                    SchedulerSpec,
                    T5Spec,
                    ToyFluxSpec,
                    TransformerSpec,
                    VAESpec,
                    build_toy_pipeline,
                    save_toy_pipeline,
)

#: where the built-in models live (installed with the package: package-data core/assets/**): the toy
#: FLUX.1 Fill (mask-guided) and the toy FLUX.1 Kontext-style instruction editor
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "assets" / "toy_flux"
SHIPPED_KONTEXT_DIR = Path(__file__).resolve().parent.parent / "assets" / "toy_kontext"


def shipped_model_dir() -> Path:
    """The shipped toy FLUX.1 Fill directory; FileNotFoundError naming the fix when it is missing."""
    if not (SHIPPED_DIR / "model_index.json").is_file():
        raise FileNotFoundError(f"the built-in model is missing from {SHIPPED_DIR}: reinstall the package, or "
                                f"rebuild it with `python -m rl.pretrain --out {SHIPPED_DIR}`")
    return SHIPPED_DIR


def shipped_kontext_dir() -> Path:
    """The shipped toy instruction editor (a FluxKontextPipeline directory); FileNotFoundError naming
    the fix when it is missing."""
    if not (SHIPPED_KONTEXT_DIR / "model_index.json").is_file():
        raise FileNotFoundError(f"the built-in instruction editor is missing from {SHIPPED_KONTEXT_DIR}: reinstall "
                                f"the package, or rebuild it with `python -m rl.pretrain --instruction --out "
                                f"{SHIPPED_KONTEXT_DIR}`")
    return SHIPPED_KONTEXT_DIR


__all__ = [
    "SHIPPED_DIR",
    "SHIPPED_KONTEXT_DIR",
    "ClipSpec",
    "SchedulerSpec",
    "T5Spec",
    "ToyFluxSpec",
    "TransformerSpec",
    "VAESpec",
    "build_toy_pipeline",
    "save_toy_pipeline",
    "shipped_kontext_dir",
    "shipped_model_dir",
]
