"""Diffusion pipelines as one checkpoint: every tensor named ``COMPONENT/NAME``.

Two forms are read:

- a **diffusers pipeline folder**: ``model_index.json`` names the components; each weight
  component (``unet/``, ``text_encoder/``, ``text_encoder_2/``, ``vae/``, ...) has its own
  ``config.json`` and ``diffusion_pytorch_model.safetensors`` or ``model.safetensors`` (sharded
  with an index or not, or the ``.fp16`` variant when it is the only one); the other folders
  (``tokenizer/``, ``scheduler/``, ``feature_extractor/``) hold no weights and are copied into a
  merged pipeline. Tensor ``down_blocks.0.resnets.0.conv1.weight`` of ``unet/`` is
  ``unet/down_blocks.0.resnets.0.conv1.weight``.
- a **single-file checkpoint** as the web UIs keep SD 1.x/2.x and SDXL: one ``.safetensors`` with
  ``model.diffusion_model.*`` (the UNet), ``first_stage_model.*`` (the VAE), ``cond_stage_model.*``
  (SD 1.x/2.x) or ``conditioner.embedders.0.*`` / ``conditioner.embedders.1.*`` (SDXL's two text
  encoders). The component prefix replaces the file's: ``model.diffusion_model.input_blocks.1.0.
  in_layers.0.weight`` is ``unet/input_blocks.1.0.in_layers.0.weight``; any other tensor (the noise
  schedule ``alphas_cumprod``, ``model_ema.*``) is in component ``other``.

Names inside a component stay those of its form, so a folder and a single file do not merge with
each other (their UNet tensors have different names). :class:`DiffusionCheckpoint` reads like a
:class:`~shoal.checkpoint.reader.CheckpointReader`, so every method, filter and gradient of a recipe
works on ``unet/...`` names as on any others.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Mapping, Sequence

import numpy as np

from shoal.checkpoint.lazy_torch import torch
from shoal.checkpoint.locate import WeightFiles, read_index, read_json_object
from shoal.checkpoint.reader import CheckpointReader
from shoal.errors import CheckpointError

MODEL_INDEX = "model_index.json"
FOLDER, SINGLE_FILE = "diffusers", "single_file"
#: single-file prefixes, most specific first: (component, prefix in the file)
SINGLE_FILE_PREFIXES = (
    ("unet", "model.diffusion_model."),
    ("vae", "first_stage_model."),
    ("text_encoder", "cond_stage_model."),
    ("text_encoder", "conditioner.embedders.0."),
    ("text_encoder_2", "conditioner.embedders.1."),
)
OTHER = "other"
UNET_MARK = "model.diffusion_model."
# weight files of a component folder, preferred first (the full-precision file before a variant)
_WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.safetensors",
    "model.safetensors.index.json", "model.safetensors",
    "diffusion_pytorch_model.safetensors.index.fp16.json", "diffusion_pytorch_model.fp16.safetensors",
    "model.safetensors.index.fp16.json", "model.fp16.safetensors",
)


def is_weight_file(name: str) -> bool:
    """Whether a file name in a component folder holds (or indexes) weights."""
    return name.endswith((".safetensors", ".bin", ".ckpt", ".pt", ".pth")) or (
        ".safetensors.index" in name or ".bin.index" in name)


@dataclass(frozen=True)
class Component:
    """One weight component: its name, where its tensors live, and what loads it."""

    name: str
    reader: CheckpointReader
    inner_prefix: str  # what the component's names carry inside the reader ("" in a folder)
    library: str | None = None  # "diffusers" or "transformers" (folders; from model_index.json)
    class_name: str | None = None
    folder: Path | None = None  # the component's folder (folders only)


def component_of(name: str) -> tuple[str, str]:
    """``"unet/conv_in.weight"`` -> ``("unet", "conv_in.weight")``."""
    component, slash, inner = name.partition("/")
    if not slash:
        raise CheckpointError(f"tensor {name!r} names no component (expected COMPONENT/NAME)")
    return component, inner


def split_components(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A merged state by component: ``{"unet": {"conv_in.weight": ...}, ...}`` (to load into a pipeline)."""
    split: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        component, inner = component_of(name)
        split.setdefault(component, {})[inner] = tensor
    return split


class DiffusionCheckpoint:
    """A pipeline folder or single-file checkpoint read as one checkpoint of ``COMPONENT/NAME`` tensors.

    Attributes: ``source``, ``path`` (the folder, or the file), ``kind`` (:data:`FOLDER` or
    :data:`SINGLE_FILE`), ``components`` (name -> :class:`Component`, in reading order),
    ``config`` (``model_index.json`` for a folder, None for a single file).
    """

    def __init__(self, source: str, path: Path, kind: str, components: Sequence[Component],
                 config: dict | None) -> None:
        self.source = source
        self.path = path
        self.kind = kind
        self.config = config
        self.components = {c.name: c for c in components}
        self._where: dict[str, tuple[CheckpointReader, str]] = {}
        for component in components:
            for inner in component.reader.tensor_names():
                if inner.startswith(component.inner_prefix) and (kind == FOLDER or _owner(inner, kind) == component.name):
                    self._where[f"{component.name}/{inner[len(component.inner_prefix):]}"] = (component.reader, inner)

    # -- names ------------------------------------------------------------------------------

    def tensor_names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def __len__(self) -> int:
        return len(self._where)

    def stored_name(self, name: str) -> str:
        """The name ``name`` has in its file (``model.diffusion_model.conv_in.weight`` for a single file)."""
        return self._locate(name)[1]

    def _locate(self, name: str) -> tuple[CheckpointReader, str]:
        try:
            return self._where[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: has no tensor {name!r}") from None

    # -- reading: what CheckpointReader does, for the component that holds the tensor ----------

    def shard_path(self, name: str) -> Path:
        reader, inner = self._locate(name)
        return reader.shard_path(inner)

    def shape(self, name: str) -> tuple[int, ...]:
        reader, inner = self._locate(name)
        return reader.shape(inner)

    def dtype(self, name: str) -> torch.dtype:
        reader, inner = self._locate(name)
        return reader.dtype(inner)

    def dtype_name(self, name: str) -> str:
        reader, inner = self._locate(name)
        return reader.dtype_name(inner)

    def nbytes(self, name: str) -> int:
        reader, inner = self._locate(name)
        return reader.nbytes(inner)

    def get(self, name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
            check_finite: bool = True) -> torch.Tensor:
        reader, inner = self._locate(name)
        return reader.get(inner, dtype=dtype, device=device, check_finite=check_finite)

    def can_read_range(self, name: str) -> bool:
        reader, inner = self._locate(name)
        return reader.can_read_range(inner)

    def read_ranges(self, name: str, bounds: Sequence[tuple[int, int]]) -> torch.Tensor:
        reader, inner = self._locate(name)
        return reader.read_ranges(inner, bounds)

    def map_range(self, name: str, start: int, stop: int) -> torch.Tensor:
        reader, inner = self._locate(name)
        return reader.map_range(inner, start, stop)

    def read_array(self, name: str, bounds: Sequence[tuple[int, int]]) -> np.ndarray:
        reader, inner = self._locate(name)
        return reader.read_array(inner, bounds)

    def map_array(self, name: str, start: int, stop: int) -> np.ndarray:
        reader, inner = self._locate(name)
        return reader.map_array(inner, start, stop)

    def release_range(self, name: str, start: int, stop: int) -> None:
        reader, inner = self._locate(name)
        reader.release_range(inner, start, stop)

    def check_range(self, name: str, values: torch.Tensor) -> None:
        reader, inner = self._locate(name)
        reader.check_range(inner, values)

    def _readers(self) -> list[CheckpointReader]:
        return list({id(c.reader): c.reader for c in self.components.values()}.values())

    def check_unchanged(self) -> None:
        for reader in self._readers():
            reader.check_unchanged()

    def close(self) -> None:
        for reader in self._readers():
            reader.close()

    def __enter__(self) -> DiffusionCheckpoint:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"DiffusionCheckpoint({self.source!r}, {self.kind}, components {list(self.components)})"


def _owner(stored: str, kind: str) -> str | None:
    """The component a stored name belongs to (single files; in a folder every name is its component's)."""
    if kind == FOLDER:
        return None
    for component, prefix in SINGLE_FILE_PREFIXES:
        if stored.startswith(prefix):
            return component
    return OTHER


def is_diffusion(reader: object) -> bool:
    return isinstance(reader, DiffusionCheckpoint)


def is_pipeline_folder(path: Path) -> bool:
    return path.is_dir() and (path / MODEL_INDEX).is_file()


def looks_like_single_file(tensor_names: Sequence[str]) -> bool:
    """Whether a single weight file is a web-UI Stable Diffusion checkpoint (it has the UNet's prefix)."""
    return any(name.startswith(UNET_MARK) for name in tensor_names)


def _component_files(folder: Path) -> WeightFiles | None:
    """The weight files of one component folder, or None when it holds no weights (a tokenizer)."""
    for name in _WEIGHT_FILES:
        path = folder / name
        if path.is_file():
            if ".index" in name:
                return read_index(path)
            return WeightFiles(format="safetensors", shards=(path,), weight_map=None, index=None)
    pickled = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix in (".bin", ".ckpt", ".pt"))
    if pickled:
        raise CheckpointError(f"{folder / pickled[0]}: pickle weights in a diffusion pipeline are not read "
                              "(only .safetensors); convert the component to safetensors")
    return None


def listed_folders(index: Mapping[str, object]) -> list[str]:
    """The component folders ``model_index.json`` names (``[library, class]`` entries, not ``[null, null]``)."""
    return [name for name, entry in index.items()
            if not name.startswith("_") and isinstance(entry, list) and len(entry) == 2 and entry[0] is not None]


def open_pipeline_folder(folder: Path, source: str | None = None) -> DiffusionCheckpoint:
    """Open a diffusers pipeline folder (``model_index.json`` and one folder per component)."""
    index = read_json_object(folder / MODEL_INDEX, "pipeline index")
    components = []
    for name in listed_folders(index):
        entry = index[name]
        sub = folder / name
        if "/" in name or name in (".", "..") or not sub.is_dir():
            raise CheckpointError(f"{folder / MODEL_INDEX}: component {name!r} has no folder {sub}")
        files = _component_files(sub)
        if files is None:
            continue  # tokenizer, scheduler, feature extractor: support folders, copied as they are
        config_path = sub / "config.json"
        config = read_json_object(config_path, "component config") if config_path.is_file() else None
        reader = CheckpointReader(str(sub), sub, files, config)
        components.append(Component(name, reader, "", library=str(entry[0]), class_name=str(entry[1]), folder=sub))
    if not components:
        raise CheckpointError(f"{folder}: the pipeline in {MODEL_INDEX} has no component with weights")
    return DiffusionCheckpoint(source or str(folder), folder, FOLDER, components, index)


def by_components(reader: CheckpointReader) -> CheckpointReader | DiffusionCheckpoint:
    """``reader`` itself, or, when it is a single-file Stable Diffusion checkpoint, that file read by components."""
    if reader.files.index is None and reader.files.format == "safetensors" and looks_like_single_file(
            reader.tensor_names()):
        return single_file_checkpoint(reader)
    return reader


def single_file_checkpoint(reader: CheckpointReader) -> DiffusionCheckpoint:
    """A single-file Stable Diffusion checkpoint (already opened as a plain reader) read by components."""
    present = {_owner(name, SINGLE_FILE) for name in reader.tensor_names()}
    components = []
    for name, prefix in SINGLE_FILE_PREFIXES:
        if name in present and any(n.startswith(prefix) for n in reader.tensor_names()):
            components.append(Component(name, reader, prefix))
    if OTHER in present:
        components.append(Component(OTHER, reader, ""))
    return DiffusionCheckpoint(reader.source, Path(reader.path), SINGLE_FILE, components, None)
