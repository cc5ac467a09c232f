"""The tasks of the miniature world.

| name     | what                                                   | who learns it          |
|----------|--------------------------------------------------------|------------------------|
| `math_a` | word problems in language A, answer a number           | the `math` specialist  |
| `lang_b` | finish a B story: how many are left (verbs new in B)   | the `lang` specialist  |
| `sort`   | sort 3-4 numbers (0..29) ascending                     | the `sort` specialist  |
| `count`  | count the words of a list of 2-9 words                 | the `count` specialist |
| `math_b` | word problems in language B (the cross task)           | nobody: held out       |
| `max`    | the largest of 3-5 numbers                             | nobody: held out       |

Tasks whose answer copies arbitrary words (reversing or rotating a word list) did not train
in the ``small`` budget, so the list skills work on numbers or produce one number.

Every split is fixed by the seed, the splits are disjoint by prompt, and each evaluation split
holds 500 examples (train more). Prompts end where the answer starts; greedy generation is
scored by extraction (the first number, or the word list up to the first ``.``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from shoal.errors import TaskError
from shoal.eval.scoring import exact_match, number_match
from shoal.eval.task import SPLITS, Example
from shoal.zoo.languages import (ADJECTIVES, B_HIDDEN_VERBS, NAMES, OBJECTS, PLACES,
                                 QUANTITY_VERBS, to_b)
from shoal.zoo.stories import random_story

EVAL_SPLIT_SIZE = 500
TRAIN_SPLIT_SIZE = 5000

Generator = Callable[[random.Random], Example]


def _math_a(rng: random.Random) -> Example:
    story = random_story(rng, tuple(QUANTITY_VERBS))
    return Example(f"{story.statement()} {story.question()}", str(story.result),
                   completion=f"{story.result} .")


def _math_b(rng: random.Random) -> Example:
    story = random_story(rng, B_HIDDEN_VERBS)
    return Example(to_b(f"{story.statement()} {story.question()}"), str(story.result),
                   completion=f"{story.result} .")


def _lang_b(rng: random.Random) -> Example:
    story = random_story(rng, B_HIDDEN_VERBS)
    return Example(to_b(f"{story.statement()} {story.lead_in()}"), str(story.result),
                   completion=to_b(f"{story.result} {story.obj} ."))


_LIST_WORDS = NAMES + OBJECTS + ADJECTIVES + PLACES


def _count(rng: random.Random) -> Example:
    words = [rng.choice(_LIST_WORDS) for _ in range(rng.randint(2, 9))]
    return Example(f"count : {' '.join(words)} =", str(len(words)),
                   completion=f"{len(words)} .")


def _largest(rng: random.Random) -> Example:
    numbers = rng.sample(range(30), rng.randint(3, 5))
    return Example(f"largest : {' '.join(str(n) for n in numbers)} =", str(max(numbers)),
                   completion=f"{max(numbers)} .")


def _sort(rng: random.Random) -> Example:
    numbers = rng.sample(range(30), rng.randint(3, 4))
    while numbers == sorted(numbers):  # an already sorted list would reward copying
        rng.shuffle(numbers)
    target = " ".join(str(n) for n in sorted(numbers))
    return Example(f"sort : {' '.join(str(n) for n in numbers)} =", target,
                   completion=f"{target} .")


@dataclass(frozen=True)
class TaskSpec:
    """How one zoo task makes and scores its examples."""

    name: str
    description: str
    generate: Generator
    answer: Literal["number", "words"]
    max_new_tokens: int
    held_out: bool = False


ZOO_TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    TaskSpec("math_a", "arithmetic word problems in language A", _math_a, "number", 3),
    TaskSpec("lang_b", "finish a language-B story with the number left", _lang_b, "number", 3),
    TaskSpec("sort", "sort 3-4 numbers ascending", _sort, "words", 6),
    TaskSpec("count", "count the words of a list of 2-9", _count, "number", 3),
    TaskSpec("math_b", "arithmetic word problems in language B (cross task)", _math_b,
             "number", 3, held_out=True),
    TaskSpec("max", "the largest of 3-5 numbers", _largest, "number", 3, held_out=True),
)}


@dataclass(frozen=True)
class SeededTask:
    """What every zoo task shares: a spec (with ``name`` and ``max_new_tokens``), the seed that
    fixes its splits, their sizes, and answers that end with " ."."""

    spec: Any
    seed: int = 0
    train_size: int = TRAIN_SPLIT_SIZE
    eval_size: int = EVAL_SPLIT_SIZE
    kind: Literal["generate", "choice"] = field(default="generate", init=False)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def max_new_tokens(self) -> int:
        return self.spec.max_new_tokens

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """Every answer ends with " ."; generation may stop there."""
        return (".",)

    def _check(self, split: str) -> None:
        if split not in SPLITS:
            raise TaskError(f"task {self.name!r} has no split {split!r}; "
                            f"splits: {', '.join(SPLITS)}")


@dataclass(frozen=True)
class ZooTask(SeededTask):
    """A zoo task for one seed; implements :class:`shoal.eval.task.Task`."""

    spec: TaskSpec

    def examples(self, split: str) -> Sequence[Example]:
        self._check(split)
        return _splits(self.spec.name, self.seed, self.train_size, self.eval_size)[split]

    def score(self, output: str, example: Example) -> float:
        if self.spec.answer == "number":
            return number_match(output, example.target)
        return exact_match(output, example.target, stop=".")


@lru_cache(maxsize=64)
def _splits(name: str, seed: int, train_size: int,
            eval_size: int) -> dict[str, tuple[Example, ...]]:
    """Draw unique prompts in a fixed order: test, validation, fitness, then train."""
    generate = ZOO_TASKS[name].generate
    rng = random.Random(f"shoal-zoo:{name}:{seed}")
    sizes = {"test": eval_size, "validation": eval_size, "fitness": eval_size,
             "train": train_size}
    wanted = sum(sizes.values())
    seen: set[str] = set()
    drawn: list[Example] = []
    attempts = 0
    while len(drawn) < wanted:
        attempts += 1
        if attempts > 50 * wanted:
            raise RuntimeError(f"task {name}: cannot draw {wanted} distinct prompts")
        example = generate(rng)
        if example.prompt not in seen:
            seen.add(example.prompt)
            drawn.append(example)
    splits: dict[str, tuple[Example, ...]] = {}
    start = 0
    for split, size in sizes.items():
        splits[split] = tuple(drawn[start:start + size])
        start += size
    return splits


def get_zoo_task(name: str, seed: int = 0) -> ZooTask:
    """The zoo task ``name`` with splits fixed by ``seed``. Unknown name: TaskError."""
    spec = ZOO_TASKS.get(name)
    if spec is None:
        raise TaskError(f"unknown zoo task {name!r}; known: {', '.join(ZOO_TASKS)}")
    return ZooTask(spec, seed)


class ZooTaskProvider:
    """The zoo's tasks for :mod:`shoal.eval.registry` (entry point ``shoal.tasks: zoo``): the
    text tasks above and the image tasks of :mod:`shoal.zoo.vision_tasks`."""

    def names(self) -> Sequence[str]:
        from shoal.zoo.vision_tasks import IMAGE_TASKS

        return tuple(ZOO_TASKS) + tuple(IMAGE_TASKS)

    def get(self, name: str, *, seed: int = 0):
        from shoal.zoo.vision_tasks import IMAGE_TASKS, get_image_task

        if name in IMAGE_TASKS:
            return get_image_task(name, seed)
        return get_zoo_task(name, seed)

    def seed_of_model(self, folder: Path) -> int | None:
        """A model of a zoo world belongs with that world's seed."""
        from shoal.zoo.references import world_seed_of_model

        return world_seed_of_model(folder)


TASK_PROVIDER = ZooTaskProvider()
