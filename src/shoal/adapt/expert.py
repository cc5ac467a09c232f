"""SVF expert files: z vectors in ``.safetensors``, metadata as JSON in the header.

Tensors: one float32 vector per adapted matrix, keyed by the weight name
(``model.layers.0.mlp.gate_proj.weight``). Header metadata: a single key ``shoal.expert``
holding the JSON of :class:`ExpertMeta` (base fingerprint, matrices and their shapes, task,
category label, objective, steps, KL weight, learning rate, scores, shoal version, and the
SVF parametrization: ``reference`` or ``direct``, see :mod:`shoal.adapt.svf`; files written
before the field existed are ``direct``).

Loading against a base checks the fingerprint and the shapes. A different fingerprint is
refused unless ``transfer=True`` (z vectors moved to another base of the same shapes);
different matrices or shapes are always refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

import shoal
from shoal.adapt.svd_cache import SVDFactors
from shoal.checkpoint.atomic import save_safetensors_atomically
from shoal.errors import ShoalError

METADATA_KEY = "shoal.expert"
FORMAT_VERSION = 1


class ExpertError(ShoalError):
    """An SVF expert file is unreadable or does not fit the model it is applied to."""


class ExpertMeta(BaseModel):
    """What an expert file says about itself."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format_version: int = FORMAT_VERSION
    base_fingerprint: str
    matrices: dict[str, tuple[int, int]]
    task: str | None = None
    label: str | None = None  # the category name used by dispatch; defaults to ``task``
    objective: str | None = None
    steps: int = 0
    kl: float = 0.0
    lr: float | None = None
    scores: dict[str, float] = {}
    shoal_version: str = shoal.__version__
    base_model: str | None = None
    parametrization: Literal["reference", "direct"] = "direct"  # absent in older files, which are direct

    @property
    def category(self) -> str:
        return self.label or self.task or "expert"


@dataclass(frozen=True)
class Expert:
    """An SVF expert: one z vector per adapted matrix, plus its metadata."""

    z: dict[str, torch.Tensor]
    meta: ExpertMeta
    path: Path | None = None

    @property
    def name(self) -> str:
        return self.meta.category

    @property
    def num_parameters(self) -> int:
        return sum(v.numel() for v in self.z.values())


def make_meta(factors: SVDFactors, **fields: object) -> ExpertMeta:
    """Metadata for an expert trained on the base described by ``factors``."""
    return ExpertMeta(base_fingerprint=factors.fingerprint,
                      matrices={n: factors.shapes[n] for n in factors.names}, **fields)  # type: ignore[arg-type]


def save_expert(path: Path, z: Mapping[str, torch.Tensor], meta: ExpertMeta) -> Path:
    """Write ``z`` (float32) and ``meta`` to ``path`` atomically (parents are created)."""
    tensors = {n: v.detach().to("cpu", torch.float32).contiguous() for n, v in z.items()}
    return save_safetensors_atomically(tensors, Path(path), {METADATA_KEY: meta.model_dump_json()})


def load_expert(path: Path, factors: SVDFactors | None = None, *, transfer: bool = False) -> Expert:
    """Read an expert; with ``factors``, check it fits that base (see the module docstring)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ExpertError(f"expert file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
            z = {name: f.get_tensor(name) for name in f.keys()}
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise ExpertError(f"expert file {path} is not a readable safetensors file: {err}") from None
    if raw is None:
        raise ExpertError(f"expert file {path} has no '{METADATA_KEY}' metadata; not an SVF expert")
    try:
        meta = ExpertMeta.model_validate(json.loads(raw))
    except (json.JSONDecodeError, ValidationError) as err:
        raise ExpertError(f"expert file {path}: invalid metadata: {err}") from None
    expert = Expert(z=z, meta=meta, path=path)
    if factors is not None:
        check_expert(expert, factors, transfer=transfer)
    return expert


def check_expert(expert: Expert, factors: SVDFactors, *, transfer: bool = False) -> None:
    """ExpertError unless ``expert`` was trained on ``factors``' base, or ``transfer`` and every
    matrix exists in this base with the same shape and rank."""
    where = expert.path or expert.name
    for name, vector in expert.z.items():
        if name not in factors.shapes:
            raise ExpertError(f"expert {where}: matrix {name} is not adapted in this model")
        shape = tuple(expert.meta.matrices.get(name, ()))
        if shape != factors.shapes[name] or vector.numel() != factors.rank(name):
            raise ExpertError(f"expert {where}: matrix {name} has shape {shape} and {vector.numel()} values, "
                              f"the model has {factors.shapes[name]} and {factors.rank(name)}")
    if expert.meta.base_fingerprint != factors.fingerprint and not transfer:
        raise ExpertError(f"expert {where} was trained on base {expert.meta.base_fingerprint}, this model "
                          f"is {factors.fingerprint}; pass transfer=True to apply it anyway")
