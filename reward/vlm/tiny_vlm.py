"""A tiny Qwen2.5-VL judge built offline from configs: model, byte-level BPE tokenizer, processor.

Used by the tests (about 100k parameters) and by the reward-model demo (a larger preset, still
trainable on a CPU in minutes). The tokenizer's merges are learned from the judge's own wording
(templates, task and dimension definitions, the synthetic world's prompt words), so queries are
short; "Yes", "No" and the digits are guaranteed single tokens. The chat template is ChatML with
Qwen's vision markers, so the same code paths serve the real Qwen2.5-VL.
"""
from __future__ import annotations

import dataclasses
import json

import torch

from core.tasks import (
    DIMENSIONS,
    EXTEND_NO_PROMPT,
    REMOVAL_PROMPT,
    TASK_DESCRIPTIONS,
    TASK_DIMENSIONS,
    TASKS,
)
from reward.vlm.prompts import LABELS, JudgeTemplates
from reward.vlm.vlm_parts import VLMParts

SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                                   "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")

# ChatML with Qwen's vision markers; text-only content may be a plain string
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


FAMILIES: tuple[str, ...] = ("qwen2_5_vl", "qwen3_vl")


@dataclasses.dataclass(frozen=True)
class TinyVLMSpec:
    """Architecture and sizes of the tiny judge. The defaults give about 150k parameters ("test").

    `family` picks the model class: "qwen2_5_vl" (Qwen2.5-VL) or "qwen3_vl" (Qwen3-VL, usually with
    patch_size 16; its image processor normalises with mean = std = 0.5 as the released one does).
    """

    family: str = "qwen2_5_vl"
    hidden: int = 32
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 64
    vision_depth: int = 2
    vision_hidden: int = 32
    vision_heads: int = 2
    vision_intermediate: int = 64
    patch_size: int = 14
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 56 * 56
    vocab_size: int = 600

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown tiny VLM family {self.family!r}; expected one of {list(FAMILIES)}")
        head_dim = self.hidden // self.heads
        if self.hidden % self.heads or head_dim % 8:
            raise ValueError(f"hidden {self.hidden} / heads {self.heads} must give a head size divisible by 8 "
                             "(the multimodal rotary embedding splits it 2:1:1)")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads {self.heads} must be a multiple of kv_heads {self.kv_heads}")


PRESETS: dict[str, TinyVLMSpec] = {
    "test": TinyVLMSpec(),
    "demo": TinyVLMSpec(hidden=96, layers=4, heads=6, kv_heads=2, intermediate=192, vision_depth=2,
                        vision_hidden=64, vision_heads=4, vision_intermediate=128,
                        min_pixels=56 * 56, max_pixels=112 * 112, vocab_size=800),
    "qwen3-test": TinyVLMSpec(family="qwen3_vl", patch_size=16, min_pixels=64 * 64, max_pixels=64 * 64),
}


def _corpus() -> list[str]:
    from core.synthetic.world import VOCABULARY

    # The mask-guided tasks' wording only: the tokenizer's merges (and so every tiny judge built from
    # a seed) stay as they were before core.tasks gained the instruction tasks. A tiny judge of
    # instruction edits would add INSTRUCTION_TASKS' descriptions, their dimensions and
    # core.synthetic.instruction_world.INSTRUCTION_WORDS here (byte-level BPE encodes them anyway, in more pieces).
    dims = [d for d in DIMENSIONS if any(d in TASK_DIMENSIONS[t] for t in TASKS)]
    texts = JudgeTemplates().texts() + [TASK_DESCRIPTIONS[t] for t in TASKS] + [DIMENSIONS[d] for d in dims]
    texts += [d.replace("_", " ") for d in dims] + [REMOVAL_PROMPT, EXTEND_NO_PROMPT]
    texts += [" ".join(VOCABULARY), "system", "user", "assistant"]
    return texts


def build_tokenizer(vocab_size: int = 600):
    """A Qwen2 tokenizer (byte-level BPE) with merges learned from the judge's wording."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=[SPECIAL_TOKENS[0]],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    labels = [w for ws in LABELS.values() for w in ws]
    bpe.train_from_iterator(_corpus() + labels * 50, trainer=trainer)
    vocab = bpe.get_vocab()
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in json.loads(bpe.to_str())["model"]["merges"]]
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, chat_template=CHAT_TEMPLATE,
                         additional_special_tokens=list(SPECIAL_TOKENS[1:]))
    for label in labels:
        if len(tok.encode(label, add_special_tokens=False)) != 1:
            raise RuntimeError(f"tiny tokenizer: label {label!r} is not a single token")  # a bug, not user input
    return tok


def build_image_processor(spec: TinyVLMSpec):
    """The PIL-backend Qwen2-VL image processor (Qwen3-VL uses the same one with mean = std = 0.5)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    norm = dict(image_mean=[0.5] * 3, image_std=[0.5] * 3) if spec.family == "qwen3_vl" else {}
    return Qwen2VLImageProcessorPil(patch_size=spec.patch_size, merge_size=spec.merge_size, temporal_patch_size=2,
                                    min_pixels=spec.min_pixels, max_pixels=spec.max_pixels, **norm)


def _config(spec: TinyVLMSpec, ids: dict[str, int], vocab_size: int, init_std: float):
    head_dim = spec.hidden // spec.heads
    quarter = head_dim // 8
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2 * quarter, quarter, quarter]}
    text = dict(vocab_size=vocab_size, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
                max_position_embeddings=4096, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"], initializer_range=init_std)
    vision = dict(depth=spec.vision_depth, hidden_size=spec.vision_hidden, intermediate_size=spec.vision_intermediate,
                  num_heads=spec.vision_heads, patch_size=spec.patch_size, spatial_merge_size=spec.merge_size,
                  temporal_patch_size=2, out_hidden_size=spec.hidden, initializer_range=init_std)
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if spec.family == "qwen3_vl":
        from transformers import Qwen3VLConfig

        side = max(1, round((spec.max_pixels ** 0.5) / spec.patch_size))
        return Qwen3VLConfig(
            text_config=dict(text, head_dim=head_dim, rope_parameters=dict(rope, mrope_interleaved=True)),
            vision_config=dict(vision, num_position_embeddings=max(16, side * side),
                               deepstack_visual_indexes=[spec.vision_depth - 1]),
            **tokens)
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=dict(text, rope_parameters=rope),
        vision_config=dict(vision, window_size=spec.patch_size * spec.merge_size * 2,
                           fullatt_block_indexes=[spec.vision_depth - 1]),
        **tokens)


def build_tiny_vlm(spec: TinyVLMSpec | str = "test", *, seed: int = 0, dtype: torch.dtype = torch.float32,
                   init_std: float = 0.02) -> VLMParts:
    """A randomly initialised tiny Qwen2.5-VL (or Qwen3-VL) with its tokenizer and image processor.

    Nothing is downloaded. `spec` is a `TinyVLMSpec` or a preset name ("test", "demo").
    `init_std` is the weights' initial standard deviation: at the usual 0.02 a tiny model answers
    almost uniformly whatever it sees; about 0.2 gives a judge whose answers depend on the input.
    The global random state is left as it was.
    """
    from transformers import AutoModelForImageTextToText

    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ValueError(f"unknown tiny VLM preset {spec!r}; expected one of {sorted(PRESETS)}")
        spec = PRESETS[spec]
    tok = build_tokenizer(spec.vocab_size)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = _config(spec, ids, len(tok), init_std)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config).to(dtype).eval()
    return VLMParts(model, tok, build_image_processor(spec))
