"""SVD of the adapted matrices, computed once in float32 and cached on disk per fingerprint.

For each chosen matrix W (m x n) the cache holds the thin SVD W = U diag(S) Vh with
U (m x k), S (k,), Vh (k x n), k = min(m, n), all float32 on the CPU. The cache file is
``<cache_dir>/<fingerprint>.safetensors`` with tensors ``<name>::U``, ``<name>::S``,
``<name>::Vh``; the fingerprint (see :mod:`shoal.adapt.fingerprint`) covers the names, shapes
and content of the matrices, so a cache is never reused for other weights.

A cache file is derived data: one that cannot be used as it is (unreadable or truncated, a
missing factor, another dtype or shape, NaN or infinite values, singular values negative or
out of order, or factors that do not give the model's matrix back on a random probe vector)
is recomputed and written again, with a warning through the ``shoal`` logger naming the file
and the reason. A cache that cannot be written (the folder is a file, or not writable) is a
CheckpointError naming it.
"""

from __future__ import annotations

import logging
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

log = logging.getLogger(__name__)
# Relative error of W x against U (S * (Vh x)) above which cached factors are not those of W:
# float32 factors of a float32 SVD agree to ~1e-6; corruption or another matrix is off by O(1).
PROBE_TOLERANCE = 1e-3


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
        if not bool(torch.isfinite(weight).all()):
            raise CheckpointError(f"matrix {name} holds NaN or infinite values; it has no SVD")
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
    try:
        save_safetensors_atomically(tensors, path, {"fingerprint": factors.fingerprint})
    except OSError as err:
        raise CheckpointError(f"cannot write the SVD cache {path}: {err.strerror or err}") from None


class _UnusableCache(Exception):
    """A cache file that must be recomputed; the message says why."""


def _load(path: Path, fingerprint: str, params: Mapping[str, torch.Tensor]) -> SVDFactors:
    """The cached factors of the matrices ``params``, checked (see the module docstring)."""
    from safetensors import SafetensorError, safe_open

    U: dict[str, torch.Tensor] = {}
    S: dict[str, torch.Tensor] = {}
    Vh: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            recorded = (f.metadata() or {}).get("fingerprint")
            if recorded != fingerprint:
                raise _UnusableCache(f"it records fingerprint {recorded}, not {fingerprint}")
            for n in params:
                U[n], S[n], Vh[n] = f.get_tensor(f"{n}::U"), f.get_tensor(f"{n}::S"), f.get_tensor(f"{n}::Vh")
    except (OSError, ValueError, RuntimeError, TypeError, SafetensorError) as err:
        raise _UnusableCache(" ".join(str(err).split()) or type(err).__name__) from None
    for n, weight in params.items():
        _check_factors(n, weight, U[n], S[n], Vh[n])
    shapes = {n: tuple(w.shape) for n, w in params.items()}
    return SVDFactors(fingerprint, tuple(params), shapes, U, S, Vh)  # type: ignore[arg-type]


def _check_factors(name: str, weight: torch.Tensor, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> None:
    m, n = weight.shape
    k = min(m, n)
    for factor, tensor, shape in (("U", U, (m, k)), ("S", S, (k,)), ("Vh", Vh, (k, n))):
        if tensor.dtype != torch.float32:
            raise _UnusableCache(f"{name}::{factor} has dtype {str(tensor.dtype).replace('torch.', '')}, not float32")
        if tuple(tensor.shape) != shape:
            raise _UnusableCache(f"{name}::{factor} has shape {tuple(tensor.shape)}, expected {shape}")
        if not bool(torch.isfinite(tensor).all()):
            raise _UnusableCache(f"{name}::{factor} holds NaN or infinite values")
    if bool((S < 0).any()) or bool((S[1:] > S[:-1] * (1 + 1e-5) + 1e-12).any()):
        raise _UnusableCache(f"the singular values of {name} are negative or not in decreasing order")
    # One random probe costs three matrix-vector products, against the SVD's cubic cost.
    probe = torch.randn(n, generator=torch.Generator().manual_seed(k), dtype=torch.float32)
    expected = (weight.detach().to(torch.float32) @ probe.to(weight.device)).cpu()
    found = U @ (S * (Vh @ probe))
    error = float((found - expected).norm() / expected.norm().clamp_min(1e-30))
    if not error <= PROBE_TOLERANCE:
        raise _UnusableCache(f"its factors of {name} do not give the matrix back (relative error {error:.2g})")


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
    if not use_cache:
        return compute_svd(model, names, fingerprint=fingerprint, progress=progress)
    folder = cache_dir or default_cache_dir()
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"SVD cache folder {folder} is a file, not a folder")
    path = folder / f"{fingerprint}.safetensors"
    if path.is_dir():
        raise CheckpointError(f"SVD cache {path} is a folder, not a file; remove it")
    if path.exists():
        try:
            return _load(path, fingerprint, {n: params[n] for n in names})
        except _UnusableCache as reason:
            log.warning("SVD cache %s cannot be used (%s); recomputing it", path, reason)
    factors = compute_svd(model, names, fingerprint=fingerprint, progress=progress)
    _save(factors, path)
    return factors
