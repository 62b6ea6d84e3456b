"""Save and load nested run state without pickle: tensors in safetensors, the rest in JSON.

`torch.load(weights_only=False)` on a checkpoint someone sent you can execute code; this format
cannot. A tree of dicts / lists / tuples / scalars / strings / tensors / NumPy arrays is split into
`<name>.safetensors` (every tensor and array, byte-exact, under its path in the tree) and
`<name>.json` (the structure, with tagged placeholders). Floats in JSON are written with Python's
shortest round-trip repr, so they come back bit-exact; NaN and infinities are allowed there (the
files are ours, not an interchange format). Tuples and non-string dict keys are tagged so that,
e.g., `random.setstate` and `torch.optim.Optimizer.load_state_dict` get exactly what they saved.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

_TENSOR, _ARRAY, _TUPLE, _DICT = "__tensor__", "__ndarray__", "__tuple__", "__items__"


class StoreError(ValueError):
    """A stored state file is missing, damaged or holds something this format does not know."""


def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = path or "root"
        tensors[key] = obj.detach().cpu().contiguous()
        return {_TENSOR: key}
    if isinstance(obj, np.ndarray):
        key = path or "root"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj))
        return {_ARRAY: key, "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, f"{path}/{k}", tensors) for k, v in obj.items()}
        return {_DICT: [[k, _encode(v, f"{path}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {_TUPLE: [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise StoreError(f"cannot store a {type(obj).__name__} at {path or 'the root'}")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if _TENSOR in obj:
        return tensors[obj[_TENSOR]]
    if _ARRAY in obj:
        return tensors[obj[_ARRAY]].numpy().astype(obj["dtype"], copy=False)
    if _TUPLE in obj:
        return tuple(_decode(v, tensors) for v in obj[_TUPLE])
    if _DICT in obj:
        return {(tuple(k) if isinstance(k, list) else k): _decode(v, tensors) for k, v in obj[_DICT]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def save_tree(obj: Any, directory: str | Path, name: str = "state") -> None:
    """Write `name.json` and `name.safetensors` into `directory` (not atomic on its own: the
    checkpoint writer renames the whole directory into place)."""
    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(obj, "", tensors)
    # safetensors refuses tensors that share memory; every stored tensor gets its own storage
    save_file({k: v.clone() for k, v in tensors.items()}, str(directory / f"{name}.safetensors"))
    (directory / f"{name}.json").write_text(json.dumps(structure))


def load_tree(directory: str | Path, name: str = "state") -> Any:
    """Read what `save_tree` wrote; never executes code from the files."""
    directory = Path(directory)
    meta, blob = directory / f"{name}.json", directory / f"{name}.safetensors"
    if not (meta.is_file() and blob.is_file()):
        raise StoreError(f"{directory}: expected {meta.name} and {blob.name}")
    try:
        structure = json.loads(meta.read_text())
        tensors = load_file(str(blob))
        return _decode(structure, tensors)
    except (json.JSONDecodeError, KeyError, OSError) as err:
        raise StoreError(f"{directory}: damaged state files ({err})") from err


def has_tree(directory: str | Path, name: str = "state") -> bool:
    directory = Path(directory)
    return (directory / f"{name}.json").is_file() and (directory / f"{name}.safetensors").is_file()
