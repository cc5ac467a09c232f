"""The miniature world: two synthetic languages, tasks, and a small base model with
specialists fine-tuned from it, all trained on CPU and deterministic for a seed.

    from shoal.zoo import build_zoo
    world = build_zoo("small")          # cached after the first build
    world.model("math")                 # a Hugging Face folder
    world.task("math_b")                # the cross task
    vlm = build_vlm_world("small")      # the vision-language world made from it
    vlm.model("vlm"); vlm.task("vqa_b") # a LLaVA folder; the image cross task

Names are imported on first use, so that the entry points into this package (``zoo:``
references, the zoo's tasks) do not load torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "WORLD_VERSION": "shoal.zoo.build", "ZooWorld": "shoal.zoo.build", "build_zoo": "shoal.zoo.build",
    "default_root": "shoal.zoo.build", "load_zoo": "shoal.zoo.build",
    "ZooError": "shoal.zoo.errors",
    "resolve_zoo_ref": "shoal.zoo.references", "resolve_zoo_reference": "shoal.zoo.references",
    "zoo_reference": "shoal.zoo.references",
    "DrawingWorld": "shoal.zoo.diffusion_build", "build_drawing_world": "shoal.zoo.diffusion_build",
    "load_drawing_world": "shoal.zoo.diffusion_build",
    "ZOO_TASKS": "shoal.zoo.tasks", "ZooTask": "shoal.zoo.tasks", "get_zoo_task": "shoal.zoo.tasks",
    "IMAGE_TASKS": "shoal.zoo.vision_tasks", "ImageZooTask": "shoal.zoo.vision_tasks",
    "get_image_task": "shoal.zoo.vision_tasks",
    "VLM_WORLD_VERSION": "shoal.zoo.vlm_build", "VlmWorld": "shoal.zoo.vlm_build",
    "build_vlm_world": "shoal.zoo.vlm_build", "default_vlm_root": "shoal.zoo.vlm_build",
    "load_vlm_world": "shoal.zoo.vlm_build",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'shoal.zoo' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
