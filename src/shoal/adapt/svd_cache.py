"""SVD of the adapted matrices, computed once in float32 and cached on disk per fingerprint.

For each chosen matrix W (m x n) the cache holds the thin SVD W = U diag(S) Vh with
U (m x k), S (k,), Vh (k x n), k = min(m, n), all float32 on the CPU. The cache file is
``<cache_dir>/<fingerprint>.safetensors`` with tensors ``<name>::U``, ``<name>::S``,
``<name>::Vh``; the fingerprint (see :mod:`shoal.adapt.fingerprint`) covers the names, shapes
and content of the matrices, so a cache is never reused for other weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from shoal.adapt.fingerprint import model_fingerprint, select_matrices
from shoal.checkpoint.atomic import save_safetensors_atomically
from shoal.errors import CheckpointError
from shoal.progress import ProgressFn, no_progress


@dataclass(frozen=True)
class SVDFactors:
    """Thin SVD factors of the chosen matrices of one base model (float32, CPU)."""

    fingerprint: str
    names: tuple[str, ...]
    shapes: dict[str, tuple[int, int]]
    U: dict[str, torch.Tensor]
    S: dict[str, torch.Tensor]
    Vh: dict[str, torch.Tensor]

    def rank(self, name: str) -> int:
        """Number of singular values (length of the z vector) of matrix ``name``."""
        return int(self.S[name].numel())

    @property
    def num_values(self) -> int:
        """Total number of singular values: the trainable parameter count of an SVF expert."""
        return sum(self.rank(n) for n in self.names)

    def ones(self) -> dict[str, torch.Tensor]:
        """The identity expert: z = 1 for every matrix."""
        return {n: torch.ones_like(self.S[n]) for n in self.names}


def default_cache_dir() -> Path:
    """``$SHOAL_CACHE/svd`` if set, else ``~/.cache/shoal/svd``."""
    root = os.environ.get("SHOAL_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "shoal") / "svd"


def compute_svd(model: nn.Module, names: Sequence[str], *, fingerprint: str | None = None,
                progress: ProgressFn = no_progress) -> SVDFactors:
    """Thin float32 SVD of the matrices ``names`` of ``model`` (no caching)."""
    params = dict(model.named_parameters())
    fingerprint = fingerprint or model_fingerprint(model, names)
    U: dict[str, torch.Tensor] = {}
    S: dict[str, torch.Tensor] = {}
    Vh: dict[str, torch.Tensor] = {}
    for i, name in enumerate(names):
        weight = params[name].detach().to(torch.float32)
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        U[name], S[name], Vh[name] = u.cpu().contiguous(), s.cpu(), vh.cpu().contiguous()
        progress("svd", i + 1, len(names))
    shapes = {n: tuple(params[n].shape) for n in names}
    return SVDFactors(fingerprint, tuple(names), shapes, U, S, Vh)  # type: ignore[arg-type]


def _save(factors: SVDFactors, path: Path) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for n in factors.names:
        tensors[f"{n}::U"], tensors[f"{n}::S"], tensors[f"{n}::Vh"] = (
            factors.U[n], factors.S[n], factors.Vh[n])
    save_safetensors_atomically(tensors, path, {"fingerprint": factors.fingerprint})


def _load(path: Path, fingerprint: str, shapes: Mapping[str, tuple[int, int]]) -> SVDFactors:
    from safetensors import SafetensorError, safe_open

    U: dict[str, torch.Tensor] = {}
    S: dict[str, torch.Tensor] = {}
    Vh: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for n, (m, k_cols) in shapes.items():
                U[n], S[n], Vh[n] = f.get_tensor(f"{n}::U"), f.get_tensor(f"{n}::S"), f.get_tensor(f"{n}::Vh")
                k = min(m, k_cols)
                if U[n].shape != (m, k) or S[n].shape != (k,) or Vh[n].shape != (k, k_cols):
                    raise CheckpointError(f"SVD cache {path}: factors of {n} do not match shape {(m, k_cols)}")
    except (OSError, KeyError, ValueError, RuntimeError, SafetensorError) as err:
        raise CheckpointError(f"SVD cache {path} is unreadable or incomplete: {err}") from None
    return SVDFactors(fingerprint, tuple(shapes), dict(shapes), U, S, Vh)


def load_or_compute_svd(model: nn.Module, *, patterns: Sequence[str] | None = None,
                        cache_dir: Path | None = None, use_cache: bool = True,
                        progress: ProgressFn = no_progress) -> SVDFactors:
    """SVD factors of the matrices of ``model`` selected by ``patterns`` (default: MLP).

    Reads ``<cache_dir>/<fingerprint>.safetensors`` when present, else computes and writes it
    (``cache_dir`` defaults to :func:`default_cache_dir`). Call this on the base weights,
    before any expert is applied.
    """
    names = select_matrices(model, patterns)
    fingerprint = model_fingerprint(model, names)
    params = dict(model.named_parameters())
    shapes = {n: tuple(params[n].shape) for n in names}
    if not use_cache:
        return compute_svd(model, names, fingerprint=fingerprint, progress=progress)
    path = (cache_dir or default_cache_dir()) / f"{fingerprint}.safetensors"
    if path.exists():
        return _load(path, fingerprint, shapes)  # type: ignore[arg-type]
    factors = compute_svd(model, names, fingerprint=fingerprint, progress=progress)
    _save(factors, path)
    return factors
