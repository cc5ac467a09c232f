"""Sentence and story generators shared by the pretraining corpus and the tasks.

Everything is produced in language A; :func:`shoal.zoo.languages.to_b` turns it into B.
Randomness comes in as a ``random.Random``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from shoal.zoo.languages import (ADJECTIVES, NAMES, OBJECTS, PLACES, PLAIN_VERBS,
                                 QUANTITY_VERBS)

_ALL_VERBS = PLAIN_VERBS + tuple(QUANTITY_VERBS)


def plain_sentence(rng: random.Random, *, quantity_verbs: bool = True) -> str:
    """One sentence without numbers. ``quantity_verbs=False`` keeps the 8 quantity verbs out."""
    verbs = _ALL_VERBS if quantity_verbs else PLAIN_VERBS
    name, other = rng.sample(NAMES, 2)
    template = rng.randrange(5)
    if template == 0:
        return f"{name} {rng.choice(verbs)} the {rng.choice(ADJECTIVES)} {rng.choice(OBJECTS)} ."
    if template == 1:
        return f"{name} {rng.choice(verbs)} the {rng.choice(OBJECTS)} in the {rng.choice(PLACES)} ."
    if template == 2:
        return f"the {rng.choice(OBJECTS)} are {rng.choice(ADJECTIVES)} ."
    if template == 3:
        return f"{name} and {other} {rng.choice(verbs)} the {rng.choice(OBJECTS)} ."
    return f"{name} {rng.choice(PLAIN_VERBS)} {other} in the {rng.choice(PLACES)} ."


def plain_text(rng: random.Random, *, quantity_verbs: bool = True) -> str:
    """Two to four plain sentences."""
    return " ".join(plain_sentence(rng, quantity_verbs=quantity_verbs)
                    for _ in range(rng.randint(2, 4)))


@dataclass(frozen=True)
class Story:
    """``name`` has ``start`` ``obj``, then ``verb`` ``amount`` of them: ``result`` are left."""

    name: str
    obj: str
    start: int
    verb: str
    amount: int

    @property
    def result(self) -> int:
        return self.start + QUANTITY_VERBS[self.verb] * self.amount

    def statement(self) -> str:
        return (f"{self.name} has {self.start} {self.obj} . "
                f"{self.name} {self.verb} {self.amount} {self.obj} .")

    def question(self) -> str:
        return f"question : how many {self.obj} does {self.name} have ? answer :"

    def lead_in(self) -> str:
        """The start of the story's last sentence; the number of objects comes next."""
        return f"now {self.name} has"


def random_story(rng: random.Random, verbs: Sequence[str]) -> Story:
    """A one-step story: start 2..20, change 1..9, result 0..29."""
    verb = rng.choice(tuple(verbs))
    start = rng.randint(2, 20)
    amount = rng.randint(1, 9) if QUANTITY_VERBS[verb] > 0 else rng.randint(1, min(9, start))
    return Story(rng.choice(NAMES), rng.choice(OBJECTS), start, verb, amount)


def told_story(story: Story) -> str:
    """The story as plain text with its outcome: ``... now tom has 5 apples .``"""
    return f"{story.statement()} {story.lead_in()} {story.result} {story.obj} ."


def lookup_text(rng: random.Random) -> str:
    """A question whose answer is read off the text (no arithmetic): the answer format."""
    name, obj, count = rng.choice(NAMES), rng.choice(OBJECTS), rng.randint(0, 29)
    parts = [f"{name} has {count} {obj} ."]
    if rng.random() < 0.5:
        parts.insert(rng.randint(0, 1), plain_sentence(rng, quantity_verbs=False))
    parts.append(f"question : how many {obj} does {name} have ? answer : {count} .")
    return " ".join(parts)
