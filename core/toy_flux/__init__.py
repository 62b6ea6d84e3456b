"""A toy-size, genuine diffusers FluxFillPipeline for the synthetic world (see docs/toy_flux.md).

- `tokenizers`: CLIP and T5 tokenizers built locally over the world's vocabulary;
- `build`: `ToyFluxSpec` and `build_toy_pipeline(spec) -> FluxFillPipeline` (random init);
- `vae_training`: resumable training of its AutoencoderKL on the world's images;
- `state`: pickle-free training state (safetensors + JSON);
- `measure`: size-versus-speed measurements (`python -m core.toy_flux.measure`).
"""
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

__all__ = ["ToyFluxSpec", "VAESpec", "ClipSpec", "T5Spec", "TransformerSpec", "SchedulerSpec", "build_toy_pipeline",
           "save_toy_pipeline"]
