"""Which weight matrices SVF adapts, and a cheap fingerprint of their content.

The fingerprint identifies a base model's chosen matrices so that an SVD cache or an SVF
expert is never used on weights it was not computed from. It is the first 16 hex digits of a
SHA-256 over, for every chosen matrix in name order: the name, the shape, the dtype and a
strided sample of at most ``SAMPLE_PER_MATRIX`` values (every ``numel // SAMPLE`` -th value
of the flattened matrix, converted to float32). Hashing a sample instead of every byte keeps
it cheap on multi-GB models; two models that differ only in values the sample misses would
collide, which is acceptable because fine-tunes and different seeds change every value.
"""

from __future__ import annotations

import hashlib
import re
from typing import Sequence

import torch
from torch import nn

from shoal.errors import ConfigError

# The MLP matrices of Llama/Qwen2/Mistral (gate/up/down_proj), GPT-2 (mlp.c_fc / mlp.c_proj),
# OPT/Phi (fc1/fc2) and GPT-NeoX (dense_h_to_4h / dense_4h_to_h).
DEFAULT_MATRIX_PATTERNS: tuple[str, ...] = (
    r"\.mlp\.(gate_proj|up_proj|down_proj)\.weight$",
    r"\.mlp\.(c_fc|c_proj)\.weight$",
    r"\.(fc1|fc2)\.weight$",
    r"\.mlp\.(dense_h_to_4h|dense_4h_to_h)\.weight$",
)

SAMPLE_PER_MATRIX = 4096


def select_matrices(model: nn.Module, patterns: Sequence[str] | None = None) -> list[str]:
    """Names of the 2-D parameters of ``model`` matching any regex in ``patterns`` (``re.search``).

    ``patterns`` defaults to the MLP matrices. No match raises ConfigError naming the patterns.
    """
    chosen = tuple(patterns) if patterns else DEFAULT_MATRIX_PATTERNS
    try:
        compiled = [re.compile(p) for p in chosen]
    except re.error as err:
        raise ConfigError(f"invalid matrix pattern {err.pattern!r}: {err}") from None
    names = [name for name, param in model.named_parameters()
             if param.ndim == 2 and any(c.search(name) for c in compiled)]
    if not names:
        raise ConfigError(f"no 2-D weight matrix matches the patterns {list(chosen)}")
    return names


def _strided_sample(tensor: torch.Tensor) -> torch.Tensor:
    flat = tensor.detach().reshape(-1)
    stride = max(1, flat.numel() // SAMPLE_PER_MATRIX)
    return flat[::stride][:SAMPLE_PER_MATRIX].to(device="cpu", dtype=torch.float32).contiguous()


def fingerprint_tensors(tensors: dict[str, torch.Tensor]) -> str:
    """Fingerprint of named tensors (see the module docstring); order-independent in the names."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(_strided_sample(tensor).numpy().tobytes())
    return digest.hexdigest()[:16]


def model_fingerprint(model: nn.Module, names: Sequence[str]) -> str:
    """Fingerprint of the matrices ``names`` of ``model`` as they are now."""
    params = dict(model.named_parameters())
    return fingerprint_tensors({name: params[name] for name in names})
