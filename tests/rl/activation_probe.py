"""Measuring what a forward keeps for its backward: every storage ops output, held weakly (tests only).

rl/planning/flux_activations.py's formula is checked against these numbers (tests/rl/test_plan.py),
on tiny FLUX and Qwen-Image transformers built here.
"""
import torch
from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from core.policies.lora import FLUX_ATTENTION_TARGETS, lora_config
from rl.planning.flux_activations import Training

#: tiny configs of the two transformer classes the formula covers
TINY_CONFIGS = {
    "FluxTransformer2DModel": {
        "patch_size": 1, "in_channels": 48, "out_channels": 16, "num_layers": 2, "num_single_layers": 3,
        "attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": 40, "pooled_projection_dim": 24,
        "guidance_embeds": True, "axes_dims_rope": (8, 12, 12)},
    "QwenImageTransformer2DModel": {
        "patch_size": 2, "in_channels": 16, "out_channels": 4, "num_layers": 3, "attention_head_dim": 32,
        "num_attention_heads": 2, "joint_attention_dim": 40, "axes_dims_rope": (8, 12, 12)},
}
TRANSFORMERS = tuple(TINY_CONFIGS)
_CLASSES = {c.__name__: c for c in (FluxTransformer2DModel, QwenImageTransformer2DModel)}


def tiny_transformer(class_name: str, dtype, lora: bool, checkpointing: bool):
    """(model, what trains) for the formula: full fine-tune, or LoRA on the attention Linears kept in
    float32 as Policy.add_lora does."""
    torch.manual_seed(0)
    model = _CLASSES[class_name](**TINY_CONFIGS[class_name]).to(dtype)
    training = Training()
    if lora:
        model.requires_grad_(False)
        model.add_adapter(lora_config(model, r=4, alpha=8), adapter_name="default")
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        training = Training(frozenset(FLUX_ATTENTION_TARGETS), 4, torch.float32)
    if checkpointing:
        model.enable_gradient_checkpointing()
    return model, training


def tiny_inputs(model, batch: int, image_tokens: int, text_tokens: int, dtype, rows: int = 8) -> dict:
    """A forward's inputs for either class (Qwen-Image: positions from a grid of `rows` rows)."""
    c = model.config
    common = {"hidden_states": torch.randn(batch, image_tokens, c.in_channels, dtype=dtype),
              "encoder_hidden_states": torch.randn(batch, text_tokens, c.joint_attention_dim, dtype=dtype),
              "timestep": torch.rand(batch, dtype=dtype), "return_dict": False}
    if isinstance(model, QwenImageTransformer2DModel):
        return {**common, "encoder_hidden_states_mask": torch.ones(batch, text_tokens, dtype=dtype),
                "img_shapes": [[(1, rows, image_tokens // rows)]] * batch}
    return {**common, "pooled_projections": torch.randn(batch, c.pooled_projection_dim, dtype=dtype),
            "guidance": torch.full((batch,), 30.0, dtype=dtype),
            "img_ids": torch.zeros(image_tokens, 3), "txt_ids": torch.zeros(text_tokens, 3)}


class Storages(TorchDispatchMode):
    """Every storage an op outputs, held weakly: the live ones are the memory in use, and `peak`
    their largest total after any op. `model`'s parameters are left out (ops on them, such as a
    transpose, output views of their storage); tensors made before the mode are not seen."""

    def __init__(self, model):
        super().__init__()
        self.params = frozenset(p.untyped_storage().data_ptr() for p in model.parameters())
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def alive(self, skip: frozenset = frozenset()) -> int:
        self.live = {ptr: (ref, n) for ptr, (ref, n) in self.live.items() if not ref.expired()}
        return sum(n for ptr, (_, n) in self.live.items() if ptr not in skip and ptr not in self.params)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                self.live[s.data_ptr()] = (StorageWeakRef(s), s.nbytes())
        self.peak = max(self.peak, self.alive())
        return out


def measure_kept_bytes(model, make_inputs) -> tuple[int, int, int]:
    """(bytes alive after the forward, bytes saved for backward, peak bytes of forward + backward).

    Alive: storages the forward created and still holds (the output excluded), which is what
    `saved_tensors_hooks` sees (the sum of unique storages, the second number) plus what a
    checkpoint holds by reference. The peak includes the parameters' gradients."""
    mode = Storages(model)
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in mode.params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with mode:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(**make_inputs())[0]  # the inputs are made inside: the embedders keep them
        alive = mode.alive(skip=frozenset({out.untyped_storage().data_ptr()}))
        out.float().square().mean().backward()
    return alive, sum(saved.values()), mode.peak
