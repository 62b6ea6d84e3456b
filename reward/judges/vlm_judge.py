"""The in-process VLM judge: any Qwen2-VL-family chat model through transformers.

Each request becomes a chat (reward/vlm/prompts.py); the answer distribution is read at the first
generated position, restricted to the mode's label tokens (their ids looked up in the tokenizer):

- "score":    expected value of "0".."5", divided by 5 (Edit-R1);
- "yesno":    P(Yes) / (P(Yes) + P(No));
- "pairwise": the same ratio for "is the first image better than the second" (OneReward); with
  `both_orders` the question is also asked with the images swapped and
  P(edited better) = (P_yes(edited, other) + 1 - P_yes(other, edited)) / 2 cancels position bias.

Images are preprocessed in torch (reward/vlm/vlm_inputs.py), so when an edited image requires grad
and grad mode is on, the scores keep the graph back to it (reward feedback learning).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import torch
from torch import Tensor

from reward.judge import Judge, JudgeRequest, Mode, check_mode, check_scores
from reward.vlm.judge_card import CARD_NAME, read_card
from reward.vlm.labels import label_token_id, label_token_ids, scores_from_label_probs  # noqa: F401 - re-exported
from reward.vlm.prompts import (
    Conversation,
    JudgeTemplates,
    build_conversations,
    conversation_images,
)
from reward.vlm.views import JudgeView
from reward.vlm.vlm_inputs import VisionSpec, encode_conversations
from reward.vlm.vlm_parts import VLMParts, load_vlm, resolve_dtype, resolve_judge_path


class TransformersJudge(Judge):
    """A chat VLM scoring `JudgeRequest`s in-process, batched with left padding.

    `model` is a local directory, a cached Hub id (never downloaded) or loaded `VLMParts`
    (then the model is used as is: trainable parameters stay trainable). Loaded from a path, the
    model is put in eval mode with its parameters frozen; gradients then reach only the images.
    """

    differentiable = True

    def __init__(self, model: str | os.PathLike | VLMParts, *, dtype: torch.dtype | str | None = None,
                 device: torch.device | str | None = None, attn_implementation: str | None = None,
                 batch_size: int = 8, both_orders: bool = False, show_crop: bool = False,
                 crop_margin: float = 0.25, crop_size: int = 224, show_source: bool = True,
                 templates: JudgeTemplates | Mapping[str, str] | str | os.PathLike | None = None,
                 max_pixels: int | None = None, min_pixels: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.view = JudgeView(show_source=show_source, crop=show_crop, crop_margin=crop_margin, crop_size=crop_size)
        #: the questions this judge may be asked (None: any; a card from reward.train narrows them)
        self.trained_modes: tuple[str, ...] | None = None
        if isinstance(model, VLMParts):
            parts = model
            if dtype is not None or device is not None:
                parts.model.to(device=device, dtype=resolve_dtype(dtype))
        else:
            model = resolve_judge_path(model)
            card = read_card(model) if os.path.isdir(model) else None
            if card is not None:
                wrong = card.mismatches(dataclasses.asdict(self.view), max_pixels, templates)
                if wrong:
                    raise ValueError(f"the judge in {os.fspath(model)} was trained seeing its images otherwise ("
                                     + "; ".join(wrong) + f"; {CARD_NAME}): ask it the way it was trained "
                                     "(rl.train: judge.show_crop / judge.max_pixels / judge.templates)")
                self.trained_modes = card.modes
            parts = load_vlm(model, dtype=dtype, device=device, attn_implementation=attn_implementation)
            parts.model.eval().requires_grad_(False)
        self.parts = parts
        self.batch_size = batch_size
        self.both_orders = both_orders
        self.templates = templates if isinstance(templates, JudgeTemplates) else JudgeTemplates.from_config(templates)
        self.spec = VisionSpec.from_image_processor(parts.image_processor, max_pixels=max_pixels,
                                                    min_pixels=min_pixels)
        self.label_ids = label_token_ids(parts.tokenizer)
        image_token_id = getattr(parts.model.config, "image_token_id", None)
        if image_token_id is None:
            raise ValueError(f"{type(parts.model).__name__} has no config.image_token_id: not a Qwen2-VL-family model")
        self.image_token_id = int(image_token_id)

    @property
    def model(self) -> torch.nn.Module:
        return self.parts.model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- model access, shared with the server and reward-model training -----------------------
    def conversations(self, requests: list[JudgeRequest], mode: str) -> list[Conversation]:
        """The chats for `requests`; pairwise with both orders gives (edited first, other first) pairs."""
        return build_conversations(requests, mode, self.templates, self.view, both_orders=self.both_orders)

    def _needs_graph(self, conversations: list[Conversation]) -> bool:
        if not torch.is_grad_enabled():
            return False
        return (any(img.requires_grad for c in conversations for img in conversation_images(c))
                or any(p.requires_grad for p in self.model.parameters()))

    def next_token_logits(self, conversations: list[Conversation]) -> Tensor:
        """Logits [N, vocab] of the first generated token of each chat (float32 or wider)."""
        rows = []
        with torch.set_grad_enabled(self._needs_graph(conversations)):
            for i in range(0, len(conversations), self.batch_size):
                inputs = encode_conversations(conversations[i:i + self.batch_size], self.parts.tokenizer, self.spec,
                                              self.image_token_id, device=self.device)
                out = self.model(**inputs, logits_to_keep=1, use_cache=False)
                logits = out.logits[:, -1]
                rows.append(logits.to(torch.promote_types(logits.dtype, torch.float32)))
        return torch.cat(rows)

    def next_token_log_probs(self, conversations: list[Conversation]) -> Tensor:
        """Log-probabilities [N, vocab] of the first generated token (what the server reports)."""
        return torch.log_softmax(self.next_token_logits(conversations), dim=-1)

    def label_probs(self, conversations: list[Conversation], mode: str) -> Tensor:
        """[N, n_labels]: the next-token distribution restricted to the mode's labels (sums to 1)."""
        logits = self.next_token_logits(conversations)
        return torch.softmax(logits[:, self.label_ids[check_mode(mode)]], dim=-1)

    def require_modes(self, modes) -> None:
        """Refuse, before any work, questions a trained judge never learned (see `trained_modes`)."""
        untrained = sorted({check_mode(m) for m in modes} - set(self.trained_modes or modes))
        if untrained:
            raise ValueError(f"this judge was trained on {'/'.join(self.trained_modes)} questions only "
                             f"({CARD_NAME}); its answers to {'/'.join(untrained)} mean nothing: ask "
                             f"{'/'.join(self.trained_modes)} (rl.train: judge.mode and judge.eval_mode)")

    # -- the judge interface ----------------------------------------------------------------
    def score(self, requests: list[JudgeRequest], mode: Mode = "score") -> Tensor:
        self.require_modes([mode])
        if not requests:
            return torch.zeros(0)
        probs = self.label_probs(self.conversations(requests, mode), mode)
        scores = scores_from_label_probs(probs, mode, both_orders=self.both_orders)
        return check_scores(scores.to(requests[0].edited.device), len(requests), "TransformersJudge")

