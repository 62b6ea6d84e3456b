"""Where a plan reads a model's architecture: its config files, never its weights.

In order: a local directory (model.path / judge.model), the Hugging Face cache (a Hub id whose
config files are cached; nothing is downloaded), then the table of known Hub ids
(rl/planning/known_models.py). Anything else is a `PlanError` that names the fix.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from rl.planning.known_models import KNOWN_PIPELINES, KNOWN_VLMS
from rl.plumbing.config_checks import BUILTIN_KINDS

#: the parts a plan builds per pipeline class (tokenizers, processor and scheduler hold no GPU memory)
PIPELINE_PARTS = ("transformer", "text_encoder", "text_encoder_2", "vae")
_QWEN_PIPELINE = "QwenImageEditPipeline"
_PARTS_OF = {_QWEN_PIPELINE: ("transformer", "text_encoder", "vae")}
#: Qwen-Image-Edit's text sequence past its image tokens: the prompt template's tail after the
#: 64 tokens the pipeline drops (user turn, vision start / end, assistant turn) and an instruction
#: of up to ~50 tokens. An assumption, said in the plan; instructions are rarely longer.
QWEN_TEXT_OVERHEAD = 64
#: Qwen2.5-VL's processor: 14-pixel patches merged 2 x 2, sides rounded to multiples of 28
_QWEN_VL_FACTOR = 28
#: the longest text sequence core.policies.qwen_image_edit.QwenImageEditPolicy accepts (the pipeline's cap)
QWEN_MAX_SEQUENCE = 1024
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_KNOWN_TABLE = "rl/planning/known_models.py"


class PlanError(ValueError):
    """No plan can be made (an unknown model, a bad config value); the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Component:
    """One model of a pipeline: its library, class and config (as JSON text, so it can be hashed)."""

    name: str
    library: str          # diffusers | transformers
    class_name: str
    config_json: str

    @property
    def config(self) -> dict[str, Any]:
        return json.loads(self.config_json)


@dataclasses.dataclass(frozen=True)
class PipelineArchitecture:
    """The FluxFillPipeline parts of model.path and where their configs came from."""

    source: str
    components: tuple[Component, ...]
    #: the most text tokens a prompt takes: FLUX's T5 prompts are always padded to it (min(512,
    #: tokenizer_2's model_max_length), as FluxFillPolicy); Qwen-Image-Edit's are cut at it (the
    #: policy's max_sequence_length). `text_tokens_at` is what a prompt takes at an image size.
    text_tokens: int
    pipeline: str = "FluxFillPipeline"

    def part(self, name: str) -> Component:
        return next(c for c in self.components if c.name == name)

    def text_tokens_at(self, image_size: int) -> int:
        """Text tokens per prompt for images of `image_size` px: FLUX's are fixed; Qwen-Image-Edit's
        Qwen2.5-VL reads the source image with the instruction, (side / 28)^2 image tokens (its
        processor's rounding) plus QWEN_TEXT_OVERHEAD."""
        if self.pipeline != _QWEN_PIPELINE:
            return self.text_tokens
        side = max(1, round(image_size / _QWEN_VL_FACTOR))
        return min(self.text_tokens, side * side + QWEN_TEXT_OVERHEAD)

    def latent_factor(self) -> int:
        """Pixels per side of one transformer token: the VAE's downsampling times the 2 x 2 packing."""
        vae = self.part("vae").config
        levels = len(vae["dim_mult"]) if "dim_mult" in vae else len(vae["block_out_channels"])
        return 2 ** (levels - 1) * 2


@dataclasses.dataclass(frozen=True)
class VLMArchitecture:
    """A chat VLM judge's config.json and where it came from."""

    name: str
    source: str
    config_json: str

    @property
    def config(self) -> dict[str, Any]:
        return json.loads(self.config_json)


def _component(name: str, library: str, class_name: str, config: dict[str, Any]) -> Component:
    return Component(name, library, class_name, json.dumps(config, sort_keys=True))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PlanError(f"cannot read {path}: {err}") from None


def _cached(repo_id: str, filename: str) -> Path | None:
    """A file of `repo_id` in the Hugging Face cache, or None (never downloads)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename)
    except ValueError:  # an id the Hub would reject (HFValidationError): not cached either
        return None
    return Path(found) if isinstance(found, str) else None


def _pipeline_from_files(source: str, find) -> PipelineArchitecture:
    """Read model_index.json and each part's config through `find(relative path) -> Path | None`."""
    index_path = find("model_index.json")
    if index_path is None:
        raise PlanError(f"{source} has no model_index.json: give a FluxFillPipeline directory")
    index = _read_json(index_path)
    pipeline = index.get("_class_name", "FluxFillPipeline")
    wanted = _PARTS_OF.get(pipeline, PIPELINE_PARTS)
    parts = []
    for name in wanted:
        entry = index.get(name)
        config_path = find(f"{name}/config.json")
        if not entry or config_path is None:
            raise PlanError(f"{source} lacks {name}/config.json (a {pipeline} needs {', '.join(wanted)})")
        parts.append(_component(name, entry[0], entry[1], _read_json(config_path)))
    tokenizer = find("tokenizer_2/tokenizer_config.json")
    max_length = _read_json(tokenizer).get("model_max_length", 512) if tokenizer is not None else 512
    return _architecture(source, parts, pipeline, max_length)


def _architecture(source: str, parts, pipeline: str, t5_max_length: int) -> PipelineArchitecture:
    """The architecture with its text-token cap: Qwen-Image-Edit's sequence cap, or FLUX's T5 length."""
    cap = QWEN_MAX_SEQUENCE if pipeline == _QWEN_PIPELINE else min(512, int(t5_max_length))
    return PipelineArchitecture(source, tuple(parts), cap, pipeline)


def _unknown(key: str, name: str, known: dict, local_files: str, json_glob: str) -> PlanError:
    return PlanError(
        f"{key} {name!r}: no architecture found. It is not a local directory, its config files are not in "
        f"the Hugging Face cache, and it is not a known Hub id ({', '.join(sorted(known))}). Fix: point {key} "
        f"at a local directory with {local_files} (config files are enough, no weights), fetch just the configs "
        f"(`hf download {name} --include '{json_glob}'`), or add its configs to {_KNOWN_TABLE}.")


def pipeline_architecture(path: str | None, kind: str = "flux_fill") -> PipelineArchitecture:
    """The pipeline architecture of model.path (kind tiny / tiny_kontext with no path: the shipped toy)."""
    if kind in BUILTIN_KINDS and path is None:
        from core.toy_flux import shipped_kontext_dir, shipped_model_dir

        shipped = shipped_model_dir() if kind == "tiny" else shipped_kontext_dir()
        arch = pipeline_architecture(str(shipped))
        name = "FLUX.1 Fill" if kind == "tiny" else "instruction editor"
        return dataclasses.replace(arch, source=f"the shipped toy {name} (core/assets/{shipped.name})")
    if path is None:
        raise PlanError("model.path is not set: give a local FluxFillPipeline directory or a Hub id")
    local = Path(path)
    if local.is_dir():
        return _pipeline_from_files(f"local directory {path}",
                                    lambda rel: (local / rel) if (local / rel).is_file() else None)
    if not _HUB_ID.fullmatch(path):
        raise PlanError(f"model.path {path!r} does not exist (and is not a Hub id like "
                        "'black-forest-labs/FLUX.1-Fill-dev')")
    if _cached(path, "model_index.json") is not None:
        return _pipeline_from_files(f"Hugging Face cache ({path})", lambda rel: _cached(path, rel))
    if path in KNOWN_PIPELINES:
        known = KNOWN_PIPELINES[path]
        pipeline = known["pipeline"]
        parts = [_component(name, *known[name]) for name in _PARTS_OF.get(pipeline, PIPELINE_PARTS)]
        max_length = known["tokenizer_2"][2]["model_max_length"] if "tokenizer_2" in known else 512
        return _architecture(f"{_KNOWN_TABLE} ({path})", parts, pipeline, max_length)
    raise _unknown("model.path", path, KNOWN_PIPELINES,
                   "model_index.json and transformer/, text_encoder/, text_encoder_2/, vae/ config.json", "*.json")


def vlm_architecture(name: str) -> VLMArchitecture:
    """The config of judge.model: a local directory (or the shipped tiny judge), a cached Hub id or a known one."""
    from reward.vlm.vlm_parts import resolve_judge_path

    local = Path(resolve_judge_path(name))
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise PlanError(f"judge.model directory {name} has no config.json")
        return VLMArchitecture(name, f"local directory {name}", json.dumps(_read_json(local / "config.json")))
    if not _HUB_ID.fullmatch(name):
        raise PlanError(f"judge.model {name!r} does not exist (and is not a Hub id like 'Qwen/Qwen2.5-VL-7B-Instruct')")
    cached = _cached(name, "config.json")
    if cached is not None:
        return VLMArchitecture(name, f"Hugging Face cache ({name})", json.dumps(_read_json(cached)))
    if name in KNOWN_VLMS:
        return VLMArchitecture(name, f"{_KNOWN_TABLE} ({name})", json.dumps(KNOWN_VLMS[name], sort_keys=True))
    raise _unknown("judge.model", name, KNOWN_VLMS, "config.json", "config.json")
