"""Tensor dtypes by name, without torch: what a safetensors tag stands for, its size, how numpy holds it.

The names are torch's (``bfloat16``, ``float32``, ...), so ``torch_dtype(name)`` is
``getattr(torch, name)`` and :func:`name_of` reads a ``torch.dtype`` back. numpy holds a dtype
it lacks as the unsigned integers of its size (``bfloat16`` as ``uint16``, the float8s as
``uint8``): the bits, unchanged. Planning and the fused merge path work on names and numpy
arrays alone, so they run without importing torch (about a second and a half of every
``shoal merge``); the code that computes with tensors asks :func:`torch_dtype`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class DTypeInfo:
    name: str  # torch's name
    tag: str  # the safetensors header's
    itemsize: int
    floating: bool
    storage: str  # the numpy dtype the bytes are held in


_INFOS = (
    DTypeInfo("bool", "BOOL", 1, False, "bool"),
    DTypeInfo("uint8", "U8", 1, False, "uint8"),
    DTypeInfo("int8", "I8", 1, False, "int8"),
    DTypeInfo("int16", "I16", 2, False, "int16"),
    DTypeInfo("uint16", "U16", 2, False, "uint16"),
    DTypeInfo("int32", "I32", 4, False, "int32"),
    DTypeInfo("uint32", "U32", 4, False, "uint32"),
    DTypeInfo("int64", "I64", 8, False, "int64"),
    DTypeInfo("uint64", "U64", 8, False, "uint64"),
    DTypeInfo("float16", "F16", 2, True, "float16"),
    DTypeInfo("bfloat16", "BF16", 2, True, "uint16"),
    DTypeInfo("float32", "F32", 4, True, "float32"),
    DTypeInfo("float64", "F64", 8, True, "float64"),
    DTypeInfo("float8_e4m3fn", "F8_E4M3", 1, True, "uint8"),
    DTypeInfo("float8_e5m2", "F8_E5M2", 1, True, "uint8"),
    DTypeInfo("float8_e8m0fnu", "F8_E8M0", 1, True, "uint8"),
)
BY_NAME = {info.name: info for info in _INFOS}
BY_TAG = {info.tag: info for info in _INFOS}
HALF = ("float16", "bfloat16")


def name_of(dtype: Any) -> str:
    """The name of a dtype given as a name or as a ``torch.dtype`` (``torch.bfloat16`` -> ``"bfloat16"``)."""
    name = str(dtype).removeprefix("torch.")
    if name not in BY_NAME:
        raise ValueError(f"not a tensor dtype shoal reads or writes: {dtype!r}")
    return name


def info(dtype: Any) -> DTypeInfo:
    return BY_NAME[name_of(dtype)]


def itemsize(dtype: Any) -> int:
    return info(dtype).itemsize


def is_floating(dtype: Any) -> bool:
    return info(dtype).floating


def storage(dtype: Any) -> np.dtype:
    """The numpy dtype that holds this dtype's bytes (its bits for those numpy lacks)."""
    return np.dtype(info(dtype).storage)


def as_float32(values: np.ndarray, dtype: str) -> np.ndarray:
    """The float32 values of an array of ``dtype``'s stored bits (exact for the half-precision dtypes and
    float32 itself, which is returned as it is)."""
    if dtype == "float32":
        return values
    if dtype == "bfloat16":
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float32)


def torch_dtype(dtype: Any) -> Any:
    """The ``torch.dtype`` of a name (imports torch)."""
    import torch

    return getattr(torch, name_of(dtype))
