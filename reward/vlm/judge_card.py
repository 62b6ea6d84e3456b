"""What a trained judge was trained to answer, and how it saw the images: `judge_card.json` in its directory.

A judge fine-tuned by `python -m reward.train` learned one question (OneReward's: pairwise) with one
view of the images (source shown or not, a close-up crop or not, a pixel cap). Asked another
question, its answer is whatever the untrained head says; shown another view, it sees inputs it
never saw. Both fail silently, so `TransformersJudge` reads the card and refuses them, naming the
setting to change. A directory without a card (a released VLM) is used as asked.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

CARD_NAME = "judge_card.json"


@dataclasses.dataclass(frozen=True)
class JudgeCard:
    """modes: the questions the judge was trained on; view: reward.vlm.views.JudgeView's fields;
    max_pixels: the pixel cap it saw images under (None: its processor's); templates: prompt
    overrides it was trained with (None: the built-in ones); made_by: how to rebuild it."""

    modes: tuple[str, ...]
    view: dict[str, Any]
    max_pixels: int | None = None
    templates: dict[str, str] | str | None = None
    made_by: str = ""
    heldout_accuracy: float | None = None

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / CARD_NAME
        path.write_text(json.dumps({**dataclasses.asdict(self), "modes": list(self.modes)}, indent=2) + "\n")
        return path

    def mismatches(self, view: dict[str, Any], max_pixels: int | None, templates: Any) -> list[str]:
        """The settings in which a use differs from training, as "name: trained X, asked Y"."""
        out = [f"{k}: trained {self.view[k]!r}, asked {view.get(k)!r}" for k in self.view if view.get(k) != self.view[k]]
        if max_pixels != self.max_pixels:
            out.append(f"max_pixels: trained {self.max_pixels!r}, asked {max_pixels!r}")
        if templates != self.templates:
            out.append(f"templates: trained {self.templates!r}, asked {templates!r}")
        return out


def read_card(directory: str | os.PathLike) -> JudgeCard | None:
    """The card of a judge directory, or None when it has none (or is a Hub id)."""
    path = Path(directory) / CARD_NAME
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())
    try:
        return JudgeCard(**{**raw, "modes": tuple(raw["modes"])})
    except (TypeError, KeyError) as err:
        raise ValueError(f"{path} is not a judge card ({err}): remove it or rebuild the judge with "
                         "python -m reward.train") from None
