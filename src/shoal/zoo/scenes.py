"""Deterministic synthetic scenes: the pictures the world's vision and drawing models learn from.

A scene is a small square picture divided into a ``grid`` x ``grid`` layout of cells; each
occupied cell holds one *thing*: one of the world's objects drawn as a flat shape, in one of
the world's colours, big or small, nudged a little inside its cell. Every word used to talk
about a scene is already a word of language A (:mod:`shoal.zoo.languages`), so the world's
tokenizer and language models need nothing new: objects are drawn as shapes (apples are
circles, cups squares, hats triangles, keys crosses), the colours are the adjectives ``red``,
``green`` and ``blue``, and the sizes ``big`` and ``small``.

Rendering is pure numpy, supersampled and box-filtered, so the same scene gives the same bytes
on every machine. Randomness comes in as a ``random.Random``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

# Object word -> the shape it is drawn as.
SHAPES: dict[str, str] = {"apples": "circle", "cups": "square", "hats": "triangle",
                          "keys": "cross"}
# Colour word -> RGB.
COLOURS: dict[str, tuple[int, int, int]] = {"red": (220, 40, 40), "green": (40, 170, 60),
                                            "blue": (40, 80, 230)}
# Size word -> the shape's half-extent as a fraction of half a cell.
SIZES: dict[str, float] = {"small": 0.45, "big": 0.85}
BACKGROUND: tuple[int, int, int] = (240, 238, 232)
MAX_OFFSET = 0.12  # how far (in cell widths) a thing may sit from its cell's centre
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Thing:
    """One object in a scene: ``obj`` (a key of :data:`SHAPES`), ``colour``, ``size``, the
    ``cell`` it occupies (row-major index) and its offset from the cell's centre."""

    obj: str
    colour: str
    size: str
    cell: int
    dx: float = 0.0
    dy: float = 0.0

    def phrase(self) -> str:
        """``"big red apples"``: how language A names the thing."""
        return f"{self.size} {self.colour} {self.obj}"


@dataclass(frozen=True)
class Scene:
    """Things in distinct cells of a ``grid`` x ``grid`` layout."""

    things: tuple[Thing, ...]
    grid: int = 2

    def __post_init__(self) -> None:
        cells = [t.cell for t in self.things]
        if len(set(cells)) != len(cells):
            raise ValueError(f"two things share a cell: {cells}")
        for t in self.things:
            if not 0 <= t.cell < self.grid * self.grid:
                raise ValueError(f"cell {t.cell} is outside a {self.grid}x{self.grid} grid")
            if t.obj not in SHAPES or t.colour not in COLOURS or t.size not in SIZES:
                raise ValueError(f"unknown object, colour or size in {t}")

    def count(self, *, obj: str | None = None, colour: str | None = None,
              size: str | None = None) -> int:
        """How many things match every attribute that is given."""
        return sum(1 for t in self.things
                   if (obj is None or t.obj == obj) and (colour is None or t.colour == colour)
                   and (size is None or t.size == size))

    def in_cell(self, cell: int) -> Thing | None:
        """The thing in ``cell``, or None when it is empty."""
        return next((t for t in self.things if t.cell == cell), None)

    def describe(self) -> str:
        """The scene in language A, things in cell order: ``"big red apples and small blue cups ."``"""
        ordered = sorted(self.things, key=lambda t: t.cell)
        return " and ".join(t.phrase() for t in ordered) + " ."


def random_scene(rng: random.Random, *, grid: int = 2, min_things: int = 1,
                 max_things: int | None = None, objects: Sequence[str] = tuple(SHAPES),
                 colours: Sequence[str] = tuple(COLOURS),
                 sizes: Sequence[str] = tuple(SIZES)) -> Scene:
    """A scene of ``min_things``..``max_things`` things (default: up to every cell) in distinct
    random cells, with attributes drawn from the given choices."""
    cells = grid * grid
    top = cells if max_things is None else min(max_things, cells)
    if not 1 <= min_things <= top:
        raise ValueError(f"min_things={min_things} and max_things={max_things} do not fit "
                         f"a {grid}x{grid} grid")
    count = rng.randint(min_things, top)
    chosen = sorted(rng.sample(range(cells), count))
    things = tuple(
        Thing(obj=rng.choice(tuple(objects)), colour=rng.choice(tuple(colours)),
              size=rng.choice(tuple(sizes)), cell=cell,
              dx=rng.uniform(-MAX_OFFSET, MAX_OFFSET), dy=rng.uniform(-MAX_OFFSET, MAX_OFFSET))
        for cell in chosen)
    return Scene(things=things, grid=grid)


def _mask(shape: str, x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    """Which points (x, y), relative to the shape's centre, lie inside a shape of half-extent r."""
    if shape == "circle":
        return x * x + y * y <= r * r
    if shape == "square":
        half = 0.8 * r  # about a circle's area
        return (np.abs(x) <= half) & (np.abs(y) <= half)
    if shape == "triangle":  # pointing up: apex at -r, base at +r (image rows grow downwards)
        return (y >= -r) & (y <= r) & (np.abs(x) <= (y + r) / 2)
    if shape == "cross":
        arm = r / 3
        return ((np.abs(x) <= r) & (np.abs(y) <= arm)) | ((np.abs(y) <= r) & (np.abs(x) <= arm))
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, size: int = 32) -> np.ndarray:
    """The scene as a ``size`` x ``size`` x 3 uint8 RGB array (supersampled, then averaged)."""
    if size < 4:
        raise ValueError(f"image size {size} is too small to draw on")
    fine = size * _SUPERSAMPLE
    centres = (np.arange(fine, dtype=np.float64) + 0.5) / fine
    xs, ys = np.meshgrid(centres, centres)
    canvas = np.empty((fine, fine, 3), dtype=np.float64)
    canvas[:] = BACKGROUND
    cell_width = 1.0 / scene.grid
    for thing in scene.things:
        row, col = divmod(thing.cell, scene.grid)
        cx = (col + 0.5 + thing.dx) * cell_width
        cy = (row + 0.5 + thing.dy) * cell_width
        inside = _mask(SHAPES[thing.obj], xs - cx, ys - cy, SIZES[thing.size] * cell_width / 2)
        canvas[inside] = COLOURS[thing.colour]
    pooled = canvas.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(np.rint(pooled), 0, 255).astype(np.uint8)


def to_pil(array: np.ndarray) -> Any:
    """A rendered array as a PIL image (Pillow is imported only here)."""
    from PIL import Image

    return Image.fromarray(np.ascontiguousarray(array))
