"""``zoo:`` model references: a model of the miniature world, built when missing.

``zoo:SIZE/NAME`` is model ``NAME`` of the world ``SIZE`` built with seed 0, and
``zoo:SIZE@SEED/NAME`` the same model of the world built with ``SEED`` (e.g.
``zoo:small@1/math``). ``zoo:SIZE[@SEED]/vlm`` is the vision-language model of that size and
seed (its own world, made from the language world; :mod:`shoal.zoo.vlm_build`). The drawing
world's pipelines are ``zoo:drawing-SIZE[@SEED]/NAME`` (e.g. ``zoo:drawing-small/fast``). The
resolver is registered with :mod:`shoal.checkpoint.references` through the ``shoal.references``
entry point; this module imports nothing heavy until a reference is actually resolved.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from shoal.zoo.errors import ZooError

SCHEME = "zoo"
MANIFEST = "manifest.json"
DRAWING_PREFIX = "drawing-"
VLM_MODEL = "vlm"  # the one model name that lives in a VLM world
_REST = re.compile(r"^(?P<size>[A-Za-z0-9_-]+)(?:@(?P<seed>-?\d+))?/(?P<name>[A-Za-z0-9_.-]+)$")


def parse_zoo_reference(rest: str) -> tuple[str, int, str]:
    """``SIZE[@SEED]/NAME`` (the text after ``zoo:``) -> ``(size, seed, name)``."""
    match = _REST.match(rest)
    if match is None:
        raise ZooError(f"'zoo:{rest}': write zoo models as zoo:SIZE/NAME or zoo:SIZE@SEED/NAME, "
                       "e.g. zoo:small/math or zoo:small@1/math")
    seed = int(match["seed"]) if match["seed"] is not None else 0
    return match["size"], seed, match["name"]


def zoo_reference(size: str, name: str, seed: int = 0) -> str:
    """The reference of model ``name`` of world ``size`` built with ``seed``."""
    return f"{SCHEME}:{size}/{name}" if seed == 0 else f"{SCHEME}:{size}@{seed}/{name}"


def resolve_zoo_reference(rest: str) -> Path:
    """The folder of the zoo model ``rest`` names (``SIZE[@SEED]/NAME``); the world is built
    (and cached) when it is missing."""
    size, seed, name = parse_zoo_reference(rest)
    if size.startswith(DRAWING_PREFIX):
        from shoal.zoo.diffusion_build import build_drawing_world

        return build_drawing_world(size[len(DRAWING_PREFIX):], seed=seed).model(name)
    if name == VLM_MODEL:
        from shoal.zoo.vlm_build import build_vlm_world

        return build_vlm_world(size, seed=seed).model(name)
    from shoal.zoo.build import build_zoo

    return build_zoo(size, seed=seed).model(name)


def resolve_zoo_ref(ref: str) -> str:
    """``zoo:...`` -> the model's folder (as text); any other reference is returned unchanged."""
    if not ref.startswith(f"{SCHEME}:"):
        return ref
    return str(resolve_zoo_reference(ref[len(SCHEME) + 1:]))


def world_seed_of_model(folder: Path) -> int | None:
    """The seed of the zoo world that holds the model folder ``folder``, or None when the folder
    is not a model of a zoo world (its parent has no world manifest naming it)."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder.parent / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or "world_version" not in manifest:
        return None
    if folder.name not in manifest.get("models", ()):
        return None
    seed = manifest.get("seed")
    return seed if isinstance(seed, int) else None
