"""A chat VLM as the three parts a judge needs (model, tokenizer, image processor): load and save.

Loading never downloads (`local_files_only`): a missing directory or an uncached Hub id is a
ValueError naming it. `AutoProcessor` may hand back only the tokenizer for some checkpoints, so
the tokenizer and the image processor are loaded separately; the image processor uses the PIL
backend (torchvision is not a dependency).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)} or a torch.dtype")
    return _DTYPES[dtype]


@dataclasses.dataclass
class VLMParts:
    """A loaded chat VLM: an `AutoModelForImageTextToText` model, its tokenizer and image processor."""

    model: nn.Module
    tokenizer: Any
    image_processor: Any

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write all three parts so `load_vlm(directory)` restores them."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        self.image_processor.save_pretrained(out)
        return out


#: the name of the tiny judge shipped with the package (reward/assets/tiny_judge), trained by
#: `python -m reward.train` on preferences over the shipped toy editor's edits (its judge_card.json
#: says with which command)
SHIPPED_JUDGE = "builtin:tiny-judge"
SHIPPED_JUDGE_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny_judge"


def resolve_judge_path(path: str | os.PathLike) -> str:
    """`SHIPPED_JUDGE` -> its directory; anything else as given."""
    name = os.fspath(path)
    return str(SHIPPED_JUDGE_DIR) if name == SHIPPED_JUDGE else name


def load_vlm(path: str | os.PathLike, *, dtype: torch.dtype | str | None = None,
             device: torch.device | str | None = None, attn_implementation: str | None = None) -> VLMParts:
    """Load a chat VLM from a local directory, an already cached Hub id (never downloading), or
    `SHIPPED_JUDGE`."""
    from transformers import (
        AutoImageProcessor,
        AutoModelForImageTextToText,
        AutoTokenizer,
    )

    name = resolve_judge_path(path)
    looks_like_path = (Path(name).is_absolute() or name.startswith(".") or name.count("/") > 1
                       or (os.sep != "/" and os.sep in name))
    if looks_like_path and not Path(name).is_dir():
        raise ValueError(f"judge model directory not found: {name}. Pass a directory written by save_pretrained "
                         "(e.g. by `python -m reward.train`) or a Hub id already in the cache.")
    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = resolve_dtype(dtype)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
        image_processor = AutoImageProcessor.from_pretrained(name, local_files_only=True, backend="pil")
        model = AutoModelForImageTextToText.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as err:  # missing files, uncached or malformed Hub ids
        where = "directory" if Path(name).exists() else "path or Hub id"
        raise ValueError(
            f"cannot load the judge VLM from {name!r} ({where}; files are never downloaded here): {err}. "
            "Pass a directory made by save_pretrained, or download the model first "
            f"(`hf download {name}`) so it is in the Hugging Face cache.") from err
    if device is not None:
        model.to(device)
    return VLMParts(model, tokenizer, image_processor)
