"""SVF expert files: z vectors in ``.safetensors``, metadata as JSON in the header.

Tensors: one float32 vector per adapted matrix, keyed by the weight name
(``model.layers.0.mlp.gate_proj.weight``). Header metadata: a single key ``shoal.expert``
holding the JSON of :class:`ExpertMeta` (base fingerprint, matrices and their shapes, task,
category label, objective, steps, KL weight, learning rate, scores, shoal version, and the
SVF parametrization: ``reference`` or ``direct``, see :mod:`shoal.adapt.svf`; files written
before the field existed are ``direct``).

Loading checks the file itself: readable safetensors with valid metadata (one line naming
the key at fault), at least one z vector, each a 1-D floating vector (read as float32) of
finite values within ``MAX_ABS_Z``, and the same matrix names in the tensors and in the
metadata. Loading against a base also checks the fingerprint and the shapes. A different
fingerprint is refused unless ``transfer=True`` (z vectors moved to another base of the same
shapes); different matrices or shapes are always refused.
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
# A z value scales a singular value. Trained experts hold values near 1 (direct) or in (0, 1)
# (reference); a value beyond this bound (a singular value grown ten thousand times) is a
# corrupt or hand-made file, and would overflow the recomposed weights in half precision.
MAX_ABS_Z = 1e4


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
    """Write ``z`` (float32) and ``meta`` to ``path`` atomically (parents are created); z vectors
    that :func:`load_expert` would refuse (NaN, beyond ``MAX_ABS_Z``, ...) are refused here."""
    tensors = {n: v.detach().to("cpu", torch.float32).contiguous() for n, v in z.items()}
    _checked_vectors(tensors, meta, Path(path))
    return save_safetensors_atomically(tensors, Path(path), {METADATA_KEY: meta.model_dump_json()})


def load_expert(path: Path, factors: SVDFactors | None = None, *, transfer: bool = False) -> Expert:
    """Read an expert; with ``factors``, check it fits that base (see the module docstring)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.is_dir():
        raise ExpertError(f"expert file {path} is a directory, not a .safetensors file")
    if not path.is_file():
        raise ExpertError(f"expert file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
            z = {name: f.get_tensor(name) for name in f.keys()}
    except (OSError, ValueError, RuntimeError, TypeError, SafetensorError) as err:
        raise ExpertError(f"expert file {path} is not a readable safetensors file: {_one_line(err)}") from None
    if raw is None:
        raise ExpertError(f"expert file {path} has no '{METADATA_KEY}' metadata; not an SVF expert")
    meta = _parse_meta(raw, path)
    expert = Expert(z=_checked_vectors(z, meta, path), meta=meta, path=path)
    if factors is not None:
        check_expert(expert, factors, transfer=transfer)
    return expert


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _parse_meta(raw: str, path: Path) -> ExpertMeta:
    """The metadata, or ExpertError naming the first key at fault (pydantic's report is several lines)."""
    where = f"expert file {path}: metadata '{METADATA_KEY}'"
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as err:
        raise ExpertError(f"{where} is not valid JSON ({_one_line(err)})") from None
    if not isinstance(data, dict):
        raise ExpertError(f"{where} is not a JSON object")
    try:
        return ExpertMeta.model_validate(data)
    except ValidationError as err:
        problems = err.errors()
        first = problems[0]
        key = ".".join(str(part) for part in first["loc"]) or "(top level)"
        if first["type"] == "extra_forbidden":
            message = f"unknown key {key!r}"
        elif first["type"] == "missing":
            message = f"key {key!r} is missing"
        else:
            message = f"key {key!r}: {first['msg']}"
        more = len(problems) - 1
        raise ExpertError(f"{where}: {message}" + (f" (and {more} more)" if more else "")) from None


def _checked_vectors(z: dict[str, torch.Tensor], meta: ExpertMeta, path: Path) -> dict[str, torch.Tensor]:
    """The z vectors as float32, or ExpertError naming the first tensor that cannot be one."""
    if not z:
        raise ExpertError(f"expert file {path} holds no z vectors")
    missing = sorted(set(meta.matrices) - set(z))
    if missing:
        raise ExpertError(f"expert file {path}: the metadata lists matrix {missing[0]}, which has no z vector")
    unlisted = sorted(set(z) - set(meta.matrices))
    if unlisted:
        raise ExpertError(f"expert file {path}: z vector {unlisted[0]} is not listed in the metadata's matrices")
    checked = {}
    for name, vector in z.items():
        if not vector.dtype.is_floating_point:
            raise ExpertError(f"expert file {path}: z vector {name} has dtype {str(vector.dtype).replace('torch.', '')}"
                              f"; z vectors are floating point")
        if vector.ndim != 1:
            raise ExpertError(f"expert file {path}: z vector {name} has shape {tuple(vector.shape)}; "
                              f"a z vector is 1-D")
        vector = vector.to(torch.float32)
        if not bool(torch.isfinite(vector).all()):
            raise ExpertError(f"expert file {path}: z vector {name} holds NaN or infinite values")
        largest = float(vector.abs().max()) if vector.numel() else 0.0
        if largest > MAX_ABS_Z:
            raise ExpertError(f"expert file {path}: z vector {name} holds {largest:.3g}, beyond the "
                              f"plausible range of +-{MAX_ABS_Z:g}")
        checked[name] = vector
    return checked


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
