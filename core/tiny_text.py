"""The tiny model's text side: a tokenizer built locally over the synthetic world's vocabulary and
a small CLIP text encoder, both real transformers objects (saved and loaded by the libraries).

Tokenizer: a `tokenizers` WordLevel model with a lowercase normaliser and pre-tokenizers that split
on whitespace, isolate punctuation and split digit strings into single digits ("42" -> "4", "2"),
so every prompt of the world is a sequence of known words. Every sequence is [BOS] ... [EOS] padded
to a fixed length. [EOS] deliberately does not get id 2: CLIPTextModel treats eos_token_id == 2 as
a legacy config and pools at the highest token id instead of at [EOS].

`PromptEncoder` turns prompts into FLUX's two text inputs: the last hidden state (joint attention
sequence) and CLIP's pooled output at [EOS]. Prompts that the tokenizer cannot represent (unknown
words, too long) are errors, not silent [UNK]s or truncations.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from torch import Tensor, nn
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from .world import VOCABULARY

SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[BOS]", "[UNK]", "[EOS]")
DEFAULT_MAX_LENGTH = 16
#: prompts cached at most (a frozen encoder over a small vocabulary sees few distinct prompts)
CACHE_LIMIT = 4096


def build_tokenizer(vocabulary: Sequence[str] = VOCABULARY, max_length: int = DEFAULT_MAX_LENGTH
                    ) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `vocabulary` (lowercase words, single digits, punctuation)."""
    words = list(dict.fromkeys(w.lower() for w in vocabulary))
    clash = [w for w in words if w in SPECIAL_TOKENS]
    if clash:
        raise ValueError(f"vocabulary contains special tokens {clash}; remove them")
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Punctuation(behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]",
        pad_token="[PAD]", model_max_length=max_length, padding_side="right")


def text_encoder_config(tokenizer: PreTrainedTokenizerBase, *, hidden_size: int = 64, num_layers: int = 2,
                        num_heads: int = 2, intermediate_size: int = 128) -> CLIPTextConfig:
    """A CLIPTextConfig sized for the tiny model, its token ids taken from `tokenizer`."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        max_position_embeddings=tokenizer.model_max_length, projection_dim=hidden_size,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)


def _check_prompt_list(prompts: Sequence[str]) -> None:
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a list of strings, one per image")


class PromptEncoder(nn.Module):
    """Tokenizer + CLIPTextModel -> (sequence embeddings [B, L, D], pooled [B, D]).

    While the text model is frozen (no parameter requires grad) encodings are cached per prompt;
    call `clear_cache()` after changing its weights in place.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, text_model: CLIPTextModel):
        super().__init__()
        if text_model.config.eos_token_id != tokenizer.eos_token_id:
            raise ValueError(
                f"text model eos_token_id {text_model.config.eos_token_id} differs from the tokenizer's "
                f"{tokenizer.eos_token_id}: build the config with text_encoder_config(tokenizer)")
        if text_model.config.max_position_embeddings < tokenizer.model_max_length:
            raise ValueError(
                f"tokenizer pads to {tokenizer.model_max_length} tokens but the text model has only "
                f"{text_model.config.max_position_embeddings} positions")
        self.tokenizer = tokenizer
        self.text_model = text_model
        self._cache: dict[str, tuple[Tensor, Tensor]] = {}

    @property
    def max_length(self) -> int:
        return self.tokenizer.model_max_length

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.text_model.parameters())

    def clear_cache(self) -> None:
        self._cache.clear()

    def tokenize(self, prompts: Sequence[str]) -> Tensor:
        """Token ids [B, max_length]; ValueError for unknown words or prompts that are too long."""
        _check_prompt_list(prompts)
        enc = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length,
                             truncation=False, return_offsets_mapping=True)
        unk = self.tokenizer.unk_token_id
        for prompt, ids, offsets in zip(prompts, enc["input_ids"], enc["offset_mapping"]):
            if len(ids) > self.max_length:
                raise ValueError(
                    f"prompt {prompt!r} has {len(ids) - 2} tokens; the tiny text encoder takes at most "
                    f"{self.max_length - 2}: shorten it")
            unknown = [prompt[a:b] for i, (a, b) in zip(ids, offsets) if i == unk]
            if unknown:
                raise ValueError(
                    f"prompt {prompt!r} has words outside the tiny model's vocabulary: {unknown}. "
                    "The built-in model only knows the synthetic world's words (core.world.VOCABULARY); "
                    "use a FLUX Fill policy for free-form prompts")
        return torch.tensor(enc["input_ids"], dtype=torch.long)

    def _run(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        out = self.text_model(input_ids=ids.to(self.text_model.device))
        return out.last_hidden_state, out.pooler_output

    def forward(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Prompts -> (last hidden state [B, L, D], pooled output at [EOS] [B, D])."""
        _check_prompt_list(prompts)
        if not self.frozen:  # trained jointly (pretraining): no cache, gradients flow
            self.clear_cache()
            return self._run(self.tokenize(prompts))
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if missing:
            if len(self._cache) + len(missing) > CACHE_LIMIT:
                self.clear_cache()
            with torch.no_grad():
                seq, pooled = self._run(self.tokenize(missing))
            for i, p in enumerate(missing):
                self._cache[p] = (seq[i], pooled[i])
        seq = torch.stack([self._cache[p][0] for p in prompts])
        pooled = torch.stack([self._cache[p][1] for p in prompts])
        return seq, pooled

    def _apply(self, fn, recurse: bool = True):
        # .to() / .half() / ... change the text model: cached tensors would be stale
        self.clear_cache()
        return super()._apply(fn, recurse)
