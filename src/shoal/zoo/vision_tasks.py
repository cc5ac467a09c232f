"""The image tasks of the miniature world: questions about pictures of things.

Every picture is a 2x2 scene (:mod:`shoal.zoo.scenes`) of one to four things of one kind and
one colour (sizes vary). The picture stands where a story names what someone has:

| name    | prompt (the picture at ``<image>``)                | answer              | who learns it |
|---------|----------------------------------------------------|---------------------|---------------|
| `look_a`| ``tom has <image> . now tom has``                  | ``3 apples``        | the VLM       |
| `vqa_a` | ``tom has <image> . tom finds 2 apples . now tom has`` | ``5 apples``     | the VLM       |
| `look_b`| the same as `look_a`, in language B                 | in B                | the VLM       |
| `vqa_b` | as `vqa_a` in B, verbs new in B (the cross task)    | in B                | nobody        |

The picture stands exactly where a story of the language world says what someone has
(``tom has 5 apples . tom finds 2 apples . now tom has 7 apples .``), and answers are the
stories' own ``N obj``, so the VLM and the language-B specialist answer in the same format.
The answer of `vqa_b` needs what the VLM sees and can name in B (how many, which kind) and what
only the language-B specialist knows (what the six quantity verbs the base never saw at work
in B do to a quantity). Colour and size are drawn but never asked. (A first world trained the
VLM on A alone; it then named what it saw in A words even when asked in B, and no merge
answered in B. A second answered ``N colour obj`` after a story without the object, and a
merge with the specialist dropped the colour, answering in the specialist's ``N obj``, VLM
world version 1.) Answers are scored by ROUGE-L over words (the
paper's metric); an answer scores 1.0 exactly when it matches word for word, so an
evaluation's ``correct`` count is its exact-match count. Splits are fixed by the seed and
disjoint by prompt and scene; pictures are drawn when a split is first asked for.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Literal, Sequence

from shoal.errors import TaskError
from shoal.eval.scoring import rouge_l
from shoal.eval.task import IMAGE_PLACEHOLDER, Example
from shoal.zoo.languages import B_HIDDEN_VERBS, NAMES, QUANTITY_VERBS, to_b
from shoal.zoo.scenes import COLOURS, SHAPES, Scene, random_scene, render
from shoal.zoo.tasks import TRAIN_SPLIT_SIZE, SeededTask

IMAGE_SIZE = 32
GRID = 2


@dataclass(frozen=True)
class Drawn:
    """One example before its picture is drawn."""

    prompt: str
    target: str
    scene: Scene

    def key(self) -> tuple:
        """What makes two examples the same question (a thing's nudge inside its cell does not)."""
        return (self.prompt, tuple((t.obj, t.colour, t.size, t.cell) for t in self.scene.things))


def _scene(rng: random.Random) -> Scene:
    obj, colour = rng.choice(tuple(SHAPES)), rng.choice(tuple(COLOURS))
    return random_scene(rng, grid=GRID, min_things=1, max_things=GRID * GRID, objects=(obj,),
                        colours=(colour,))


def _answer(scene: Scene, count: int) -> str:
    """``5 apples``: how the language world's stories end."""
    return f"{count} {scene.things[0].obj}"


def _look(rng: random.Random) -> Drawn:
    scene, name = _scene(rng), rng.choice(NAMES)
    return Drawn(f"{name} has {IMAGE_PLACEHOLDER} . now {name} has", _answer(scene, len(scene.things)),
                 scene)


def _story(verbs: Sequence[str]) -> Callable[[random.Random], Drawn]:
    def draw(rng: random.Random) -> Drawn:
        scene, name, verb = _scene(rng), rng.choice(NAMES), rng.choice(tuple(verbs))
        count, sign = len(scene.things), QUANTITY_VERBS[verb]
        amount = rng.randint(1, 9) if sign > 0 else rng.randint(1, count)
        obj = scene.things[0].obj
        prompt = f"{name} has {IMAGE_PLACEHOLDER} . {name} {verb} {amount} {obj} . now {name} has"
        return Drawn(prompt, _answer(scene, count + sign * amount), scene)
    return draw


def _in_b(draw: Callable[[random.Random], Drawn]) -> Callable[[random.Random], Drawn]:
    def draw_b(rng: random.Random) -> Drawn:
        drawn = draw(rng)
        return Drawn(to_b(drawn.prompt), to_b(drawn.target), drawn.scene)
    return draw_b


@dataclass(frozen=True)
class ImageTaskSpec:
    """How one image task makes its examples."""

    name: str
    description: str
    draw: Callable[[random.Random], Drawn]
    language: Literal["a", "b"]
    max_new_tokens: int = 5
    held_out: bool = False


IMAGE_TASKS: dict[str, ImageTaskSpec] = {spec.name: spec for spec in (
    ImageTaskSpec("look_a", "say what the picture shows (language A)", _look, "a"),
    ImageTaskSpec("vqa_a", "a story about the things in the picture (language A)",
                  _story(tuple(QUANTITY_VERBS)), "a"),
    ImageTaskSpec("look_b", "say what the picture shows (language B)", _in_b(_look), "b"),
    ImageTaskSpec("vqa_b", "a story about the picture in language B, verbs new in B (cross task)",
                  _in_b(_story(B_HIDDEN_VERBS)), "b", held_out=True),
)}


@lru_cache(maxsize=32)
def _drawn(name: str, seed: int, train_size: int, eval_size: int) -> dict[str, tuple[Drawn, ...]]:
    """Unique examples in a fixed order: test, validation, fitness, then train (so a smaller
    train split is a prefix of the full one and the evaluation splits do not move)."""
    draw = IMAGE_TASKS[name].draw
    rng = random.Random(f"shoal-zoo-image:{name}:{seed}")
    sizes = {"test": eval_size, "validation": eval_size, "fitness": eval_size, "train": train_size}
    wanted = sum(sizes.values())
    seen: set[tuple] = set()
    drawn: list[Drawn] = []
    attempts = 0
    while len(drawn) < wanted:
        attempts += 1
        if attempts > 50 * wanted:
            raise RuntimeError(f"image task {name}: cannot draw {wanted} distinct examples")
        example = draw(rng)
        if example.key() not in seen:
            seen.add(example.key())
            drawn.append(example)
    splits, start = {}, 0
    for split, size in sizes.items():
        splits[split] = tuple(drawn[start:start + size])
        start += size
    return splits


class PicturedSplit(Sequence[Example]):
    """The examples of one split, each picture drawn the first time its example is read (a
    slice draws only the examples it holds)."""

    def __init__(self, drawn: tuple[Drawn, ...]) -> None:
        self._drawn = drawn
        self._done: dict[int, Example] = {}

    def __len__(self) -> int:
        return len(self._drawn)

    def _example(self, index: int) -> Example:
        example = self._done.get(index)
        if example is None:
            d = self._drawn[index]
            example = Example(d.prompt, d.target, completion=f"{d.target} .",
                              images=(render(d.scene, IMAGE_SIZE),))
            self._done[index] = example
        return example

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self._example(i) for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self._example(index)


@lru_cache(maxsize=32)
def _examples(name: str, seed: int, train_size: int, eval_size: int, split: str) -> PicturedSplit:
    return PicturedSplit(_drawn(name, seed, train_size, eval_size)[split])


@dataclass(frozen=True)
class ImageZooTask(SeededTask):
    """An image task for one seed; implements :class:`shoal.eval.task.Task`."""

    spec: ImageTaskSpec

    def drawn(self, split: str) -> tuple[Drawn, ...]:
        """The examples of ``split`` before their pictures are drawn (prompt, target, scene)."""
        self._check(split)
        return _drawn(self.name, self.seed, self.train_size, self.eval_size)[split]

    def examples(self, split: str) -> Sequence[Example]:
        self._check(split)
        return _examples(self.name, self.seed, self.train_size, self.eval_size, split)

    def score(self, output: str, example: Example) -> float:
        return rouge_l(output, example.target, stop=".")


def get_image_task(name: str, seed: int = 0, *, train_size: int = TRAIN_SPLIT_SIZE) -> ImageZooTask:
    """The image task ``name`` with splits fixed by ``seed``. Unknown name: TaskError."""
    spec = IMAGE_TASKS.get(name)
    if spec is None:
        raise TaskError(f"unknown zoo image task {name!r}; known: {', '.join(IMAGE_TASKS)}")
    return ImageZooTask(spec, seed, train_size=train_size)
