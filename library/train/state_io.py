"""Pickle-free files for training state: nested Python structures as JSON, their tensors as safetensors.

A state folder may come from someone else, so reading one must never run code: pickle (torch.save, accelerate's
save_state) can run arbitrary code when loaded, JSON and safetensors cannot. Optimizer and scheduler state dicts are
trees of dicts, lists, tuples, numbers, strings and tensors; `write_tree` stores the tree in NAME.json with every
tensor replaced by a reference into NAME.safetensors, and `read_tree` rebuilds it exactly (tuples stay tuples, int
dict keys stay ints). Anything else in a tree is refused when saving, with the path to the odd value, rather than
written in a form that cannot be read back.
"""
from __future__ import annotations

import json
import os
import random
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from library.errors import UserError

_TENSOR, _TUPLE, _DICT, _DTYPE = "__tensor__", "__tuple__", "__dict__", "__dtype__"
_PLAIN = (type(None), bool, int, float, str)


class StateFormatError(UserError):
    """A state file is missing, unreadable, or does not hold what it should."""


def encode_tree(value: Any, tensors: dict[str, torch.Tensor], where: str = "") -> Any:
    """A JSON-serialisable copy of `value`; tensors are moved (as contiguous CPU copies) into `tensors`."""
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()
        return {_TENSOR: key}
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, torch.dtype):
        return {_DTYPE: str(value).removeprefix("torch.")}
    if isinstance(value, list):
        return [encode_tree(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {_TUPLE: [encode_tree(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: encode_tree(v, tensors, f"{where}.{k}") for k, v in value.items()}
        for k in value:
            if not isinstance(k, _PLAIN):
                raise TypeError(f"{where or 'the state'}: a dict key of type {type(k).__name__}")
        return {_DICT: [[k, encode_tree(v, tensors, f"{where}[{k!r}]")] for k, v in value.items()]}
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{where or 'the state'}: a value of type {type(value).__module__}.{type(value).__name__}")


def decode_tree(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `encode_tree`. Only builds dicts, lists, tuples, plain values, tensors and dtypes."""
    if isinstance(value, list):
        return [decode_tree(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        (tag, inner), = value.items()
        if tag == _TENSOR:
            if inner not in tensors:
                raise ValueError(f"tensor {inner!r} is missing from the .safetensors file")
            return tensors[inner]
        if tag == _TUPLE:
            return tuple(decode_tree(v, tensors) for v in inner)
        if tag == _DICT:
            return {k: decode_tree(v, tensors) for k, v in inner}
        if tag == _DTYPE:
            dtype = getattr(torch, str(inner), None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"unknown dtype {inner!r}")
            return dtype
    return {k: decode_tree(v, tensors) for k, v in value.items()}


def write_json(path: str, value: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1)


def read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise StateFormatError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StateFormatError(f"{path} is unreadable ({e})") from None


def write_tree(folder: str, name: str, value: Any) -> None:
    """NAME.json (the structure) and NAME.safetensors (its tensors) in `folder`."""
    tensors: dict[str, torch.Tensor] = {}
    try:
        tree = encode_tree(value, tensors)
    except TypeError as e:
        raise UserError(f"cannot save the {name} state without pickle: {e} is not a number, string, list, dict or "
                        "tensor. Use another optimizer/scheduler or save without --save_state") from None
    save_file(tensors, os.path.join(folder, f"{name}.safetensors"))
    write_json(os.path.join(folder, f"{name}.json"), tree)


def read_tensors(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise StateFormatError(f"{path} is missing")
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise StateFormatError(f"{path} is unreadable ({e})") from None


def read_tree(folder: str, name: str) -> Any:
    tree = read_json(os.path.join(folder, f"{name}.json"))
    tensors = read_tensors(os.path.join(folder, f"{name}.safetensors"))
    try:
        return decode_tree(tree, tensors)
    except (ValueError, TypeError) as e:
        raise StateFormatError(f"{os.path.join(folder, name)}.json does not match its .safetensors ({e})") from None


# --- random number generators ---------------------------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    """This process's generators: torch CPU and CUDA states (uint8 tensors), Python's and NumPy's (numbers)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured (after a JSON round trip). CUDA states are restored for as many devices
    as both the state and this machine have."""
    try:
        torch.set_rng_state(state["torch"])
        cuda = state["torch_cuda"]
        if cuda and torch.cuda.is_available():
            n = min(len(cuda), torch.cuda.device_count())
            torch.cuda.set_rng_state_all(cuda[:n])
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise StateFormatError(f"the saved random number generator state is malformed ({e})") from None
