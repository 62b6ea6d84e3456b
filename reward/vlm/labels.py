"""The judge's answer tokens and how their probabilities become a score in [0, 1].

Every backend reads the distribution of the first generated token restricted to the mode's labels
(`prompts.LABELS`): "0".."5" for "score", "Yes"/"No" for "yesno" and "pairwise". The in-process judge
gets the probabilities from logits, the API judge from returned log-probabilities; both end here.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from reward.vlm.prompts import LABELS


def label_token_id(tokenizer: Any, label: str) -> int:
    """The id of `label` as the first generated token; a ValueError if it is not a single token."""
    ids = tokenizer.encode(label, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(
            f"the judge's tokenizer splits the label {label!r} into {len(ids)} tokens {ids}; the judge reads "
            "one answer token, so use a model whose tokenizer has it as a single token (Qwen2/2.5/3-VL do)")
    return int(ids[0])


def label_token_ids(tokenizer: Any) -> dict[str, list[int]]:
    """{mode: [token id of each label, in `LABELS[mode]` order]}, looked up in the tokenizer."""
    return {mode: [label_token_id(tokenizer, label) for label in labels] for mode, labels in LABELS.items()}


def scores_from_label_probs(probs: Tensor, mode: str, *, both_orders: bool = False) -> Tensor:
    """Label distributions [rows, n_labels] -> one score per request.

    "score": expected digit / 5. "yesno"/"pairwise": P(Yes). Pairwise with `both_orders` expects the
    rows interleaved (edited first, other first) per request and returns
    (P_yes(edited, other) + 1 - P_yes(other, edited)) / 2.
    """
    if mode == "score":
        levels = torch.arange(probs.shape[-1], dtype=probs.dtype, device=probs.device)
        return (probs * levels).sum(-1) / (probs.shape[-1] - 1)
    yes = probs[:, 0]
    if mode == "pairwise" and both_orders:
        if yes.shape[0] % 2:
            raise ValueError(f"both-order pairwise scoring needs an even number of rows, got {yes.shape[0]}")
        return (yes[0::2] + 1 - yes[1::2]) / 2
    return yes


def label_token_id_map(tokenizer: Any) -> dict[str, int]:
    """{label text: token id} for every label of every mode (what `OpenAIJudge(label_token_ids=)` takes)."""
    return {label: label_token_id(tokenizer, label) for labels in LABELS.values() for label in labels}
