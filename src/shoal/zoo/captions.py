"""What the drawing world's models are asked to draw: one thing, in A or B words.

A *drawing* is one object (drawn as its shape, :data:`shoal.zoo.scenes.SHAPES`), a colour,
a size and a cell of a 2 x 2 grid; its prompt in language A is ``"big red apples in 3 ."``
(cells are numbered 1..4, row-major) and in language B the same words through
:func:`shoal.zoo.languages.to_b` (the cell number stays: digits are shared by A and B). A
drawing may leave its cell unnamed (``cell = -1``, ``"big red apples ."``): the thing may then
sit in any cell, so the image is not determined by the prompt, and a sampler that takes few
steps without having been distilled for them blurs between the possible pictures (the reason
SDXL-Turbo / Lightning exist); the judge then does not check the cell.

The 120 drawings (96 with a cell, 24 without) are split once per world seed into ``train`` /
``fitness`` / ``validation`` / ``test``. Every model of a world sees every drawing in language A (the world's visual
knowledge); only ``train`` drawings are ever captioned in B for training, so the B prompts
of the other three splits are held out from every model.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from itertools import product

import numpy as np

from shoal.zoo.languages import to_b
from shoal.zoo.scenes import COLOURS, MAX_OFFSET, SHAPES, SIZES, Scene, Thing, render

GRID = 2
ANY_CELL = -1
LANGUAGES = ("a", "b")
SPLITS = ("train", "fitness", "validation", "test")
_SPLIT_FRACTIONS = {"fitness": 0.20, "validation": 0.10, "test": 0.30}  # train: the rest
_SPLIT_SALT = 7919


@dataclass(frozen=True, order=True)
class Drawing:
    """One thing to draw: ``obj`` (a key of SHAPES), ``colour``, ``size`` and ``cell``
    (0..3, or ANY_CELL when the prompt does not say where)."""

    obj: str
    colour: str
    size: str
    cell: int

    def prompt(self, language: str = "a") -> str:
        """The prompt in ``language`` ("a" or "b"): ``"big red apples in 3 ."`` in A."""
        where = f" in {self.cell + 1}" if self.cell >= 0 else ""
        text = f"{self.size} {self.colour} {self.obj}{where} ."
        if language == "a":
            return text
        if language == "b":
            return to_b(text)
        raise ValueError(f"unknown language {language!r}; known: a, b")

    def scene(self, rng: random.Random | None = None) -> Scene:
        """The drawing as a scene; ``rng`` nudges the thing inside its cell (None: centred) and
        picks the cell when the drawing leaves it unnamed (None: the first)."""
        dx = dy = 0.0
        cell = self.cell
        if rng is not None:
            if cell < 0:
                cell = rng.randrange(GRID * GRID)
            dx, dy = rng.uniform(-MAX_OFFSET, MAX_OFFSET), rng.uniform(-MAX_OFFSET, MAX_OFFSET)
        return Scene(things=(Thing(self.obj, self.colour, self.size, max(cell, 0), dx, dy),),
                     grid=GRID)


# The judge's heads, in a fixed order: attribute -> its classes.
ATTRIBUTES: dict[str, tuple[str, ...] | tuple[int, ...]] = {
    "obj": tuple(SHAPES), "colour": tuple(COLOURS), "size": tuple(SIZES),
    "cell": tuple(range(GRID * GRID)),
}


def all_drawings() -> tuple[Drawing, ...]:
    """Every drawing of the world, in a fixed order (those with an unnamed cell included)."""
    return tuple(Drawing(o, c, s, cell) for o, c, s, cell in
                 product(SHAPES, COLOURS, SIZES, (ANY_CELL, *range(GRID * GRID))))


def drawing_splits(seed: int) -> dict[str, tuple[Drawing, ...]]:
    """The world ``seed``'s drawings by split; disjoint, together :func:`all_drawings`."""
    drawings = list(all_drawings())
    random.Random(seed * _SPLIT_SALT + 1).shuffle(drawings)
    splits: dict[str, tuple[Drawing, ...]] = {}
    start = 0
    for name, fraction in _SPLIT_FRACTIONS.items():
        count = round(fraction * len(drawings))
        splits[name] = tuple(sorted(drawings[start:start + count]))
        start += count
    splits["train"] = tuple(sorted(drawings[start:]))
    return {name: splits[name] for name in SPLITS}


def labels_of(drawings: list[Drawing] | tuple[Drawing, ...]) -> dict[str, np.ndarray]:
    """Class indices per attribute (the judge's targets), each of shape ``(n,)``; an unnamed
    cell is -1 (any reading is right)."""
    return {name: np.array([-1 if name == "cell" and d.cell < 0 else classes.index(getattr(d, name))
                            for d in drawings], dtype=np.int64)
            for name, classes in ATTRIBUTES.items()}


def render_drawings(drawings: list[Drawing] | tuple[Drawing, ...], rng: random.Random | None,
                    size: int = 32) -> np.ndarray:
    """The drawings rendered, ``(n, size, size, 3)`` uint8; ``rng`` nudges each thing."""
    return np.stack([render(d.scene(rng), size) for d in drawings])


def noise_seed(world_seed: int, split: str, drawing: Drawing, copy: int) -> int:
    """The noise seed of one drawing of a split (the same in A and B, so scores pair up)."""
    index = all_drawings().index(drawing)
    return ((world_seed * 31 + SPLITS.index(split)) * 1000 + index) * 16 + copy


def drawing_task(world_seed: int, split: str, language: str, *, copies: int = 1):
    """The split's drawings as prompts in ``language``, each drawn ``copies`` times from
    different fixed noise: a :class:`shoal.eval.drawing.DrawingTask`."""
    from shoal.eval.drawing import DrawingTask

    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    drawings = [d for d in drawing_splits(world_seed)[split] for _ in range(copies)]
    copy_of = [c for _ in drawing_splits(world_seed)[split] for c in range(copies)]
    labels = labels_of(drawings)
    return DrawingTask(
        name=f"draw_{language}_{split}", prompts=tuple(d.prompt(language) for d in drawings),
        noise_seeds=tuple(noise_seed(world_seed, split, d, c) for d, c in zip(drawings, copy_of)),
        targets={k: tuple(v.tolist()) for k, v in labels.items()})
