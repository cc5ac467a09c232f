"""Singular Value Fine-tuning: W' = U diag(S * z) Vh, applied in place or differentiably.

Two parametrizations of an expert's z vectors (the expert file records which):

- ``reference`` (the default; Sakana's self-adaptive-llms ``utils.compose_new_params``):
  W' = U diag(S * z) Vh * sum(S) / sum(S * z). The rescale keeps the sum of the singular
  values, so z = c * 1 gives W back for any c > 0 and only the relative sizes of z matter.
  Training learns a logit p with z = sigmoid(p) (see :mod:`shoal.adapt.train`).
- ``direct`` (shoal's first form, and what expert files without the field hold):
  W' = U diag(S * z) Vh, z trained as is from 1.

:class:`SVFAdapter` keeps a copy of the original matrices so that :meth:`SVFAdapter.restore`
gives them back bitwise (recomposing with z = 1 would only be close, not equal), and applies
an expert in place with one matrix product per matrix, cheap enough to switch per batch.
:func:`recompose` is the differentiable form used for training z.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Literal, Mapping

import torch
from torch import nn

from shoal.adapt.fingerprint import model_fingerprint
from shoal.adapt.svd_cache import SVDFactors
from shoal.errors import ConfigError

ZVectors = Mapping[str, torch.Tensor]
Parametrization = Literal["reference", "direct"]
PARAMETRIZATIONS: tuple[str, ...] = ("reference", "direct")


def check_parametrization(parametrization: str) -> Parametrization:
    if parametrization not in PARAMETRIZATIONS:
        raise ConfigError(f"unknown SVF parametrization {parametrization!r}; use 'reference' or 'direct'")
    return parametrization  # type: ignore[return-value]


def recompose(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, z: torch.Tensor, *,
              rescale: bool = False) -> torch.Tensor:
    """U diag(S * z) Vh in float32, differentiable in ``z``; with ``rescale`` times
    sum(S) / sum(S * z). U (m, k), S (k,), Vh (k, n), z (k,)."""
    scaled = S * z.to(S.dtype)  # (k,)
    weight = (U * scaled) @ Vh  # (m, n)
    if not rescale:
        return weight
    total = scaled.sum()
    # z = 0 everywhere (e.g. every mixing weight of a matrix clamped to 0) has no scale to
    # restore; the reference divides by zero (NaN weights), here the matrix is simply zero.
    return weight * torch.where(total == 0, torch.ones_like(total), S.sum() / total)


def check_z(factors: SVDFactors, z: ZVectors, *, source: str = "expert") -> None:
    """ConfigError naming the matrix when ``z`` has an unknown matrix, a wrong length or a
    NaN or infinite value (which would spread through every weight it recomposes)."""
    for name, vector in z.items():
        if name not in factors.S:
            raise ConfigError(f"{source}: matrix {name} is not one of the adapted matrices")
        if tuple(vector.shape) != tuple(factors.S[name].shape):
            raise ConfigError(f"{source}: z for {name} has shape {tuple(vector.shape)}, "
                              f"expected {tuple(factors.S[name].shape)}")
        if not bool(torch.isfinite(vector).all()):
            raise ConfigError(f"{source}: z for {name} holds NaN or infinite values")


class SVFAdapter:
    """Applies SVF experts to a model in place and restores its original weights.

    Build it on the base weights (the factors' fingerprint is checked). It holds a copy of
    each adapted matrix (extra memory: the size of those matrices) and the factors on the
    model's device. ``parametrization`` says how the z vectors it is given are applied (see
    the module docstring); every expert applied through one adapter must share it.
    """

    def __init__(self, model: nn.Module, factors: SVDFactors, *,
                 parametrization: Parametrization = "reference") -> None:
        self.parametrization = check_parametrization(parametrization)
        self.rescale = parametrization == "reference"
        found = model_fingerprint(model, factors.names)
        if found != factors.fingerprint:
            raise ConfigError(f"model matrices have fingerprint {found}, the SVD factors were "
                              f"computed for {factors.fingerprint}")
        params = dict(model.named_parameters())
        self.model = model
        self.factors = factors
        self.params = {n: params[n] for n in factors.names}
        self.originals = {n: p.detach().clone() for n, p in self.params.items()}
        device = next(iter(self.params.values())).device
        self.U = {n: factors.U[n].to(device) for n in factors.names}
        self.S = {n: factors.S[n].to(device) for n in factors.names}
        self.Vh = {n: factors.Vh[n].to(device) for n in factors.names}
        self.current: ZVectors | None = None

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    @torch.no_grad()
    def apply(self, z: ZVectors | None) -> None:
        """Set each matrix in ``z`` to its recomposition (cast to the weight dtype); every other
        adapted matrix gets its original back. ``None`` restores everything."""
        if z is None:
            self.restore()
            return
        check_z(self.factors, z)
        for name, param in self.params.items():
            if name in z:
                weight = recompose(self.U[name], self.S[name], self.Vh[name], z[name].to(self.device),
                                   rescale=self.rescale)
                param.copy_(weight.to(param.dtype))
            else:
                param.copy_(self.originals[name])
        self.current = z

    @torch.no_grad()
    def restore(self) -> None:
        """Put the original matrices back, bitwise."""
        for name, param in self.params.items():
            param.copy_(self.originals[name])
        self.current = None

    @contextmanager
    def applied(self, z: ZVectors | None) -> Iterator[None]:
        """Context in which ``z`` is applied; the original weights come back on exit."""
        self.apply(z)
        try:
            yield
        finally:
            self.restore()

    def adapted_weights(self, z: ZVectors) -> dict[str, torch.Tensor]:
        """Differentiable recomposition of every matrix in ``z``, in the weight dtype."""
        return {name: recompose(self.U[name], self.S[name], self.Vh[name], vector,
                                rescale=self.rescale).to(self.params[name].dtype)
                for name, vector in z.items()}

    def forward(self, z: ZVectors, **inputs: Any) -> Any:
        """``model(**inputs)`` with the matrices in ``z`` replaced by their recomposition,
        differentiable in ``z`` (the model's own parameters are left untouched)."""
        return torch.func.functional_call(self.model, self.adapted_weights(z), args=(), kwargs=inputs,
                                          strict=False)


def mix_experts(experts: list[ZVectors], alpha: torch.Tensor) -> dict[str, torch.Tensor]:
    """z' = sum_k alpha_k z_k. ``alpha`` is (K,) (one weight per expert) or (K, M) (one weight per
    expert and matrix, matrices in the sorted order of the first expert's names). As in the
    reference (``policy.WeightedCombination``), the z vectors are mixed, not the weights; the
    ``reference`` rescale is applied to the mixture when it is recomposed."""
    names = sorted(experts[0])
    if alpha.ndim == 1:
        alpha = alpha[:, None].expand(len(experts), len(names))
    if alpha.shape != (len(experts), len(names)):
        raise ConfigError(f"alpha has shape {tuple(alpha.shape)}, expected ({len(experts)},) or "
                          f"({len(experts)}, {len(names)})")
    return {name: sum(alpha[k, j] * experts[k][name].float() for k in range(len(experts)))
            for j, name in enumerate(names)}
