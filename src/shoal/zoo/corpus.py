"""Training data: the base model's pretraining mix and each specialist's fine-tuning mix.

A document is a ``(prompt, completion)`` pair of texts; the loss is taken on the completion
only, so plain text is ``("", text)``. A mix is a list of weighted sources, each a function of
a ``random.Random`` that returns one document.

The pretraining mix follows the feasibility probe (see ``WORLD-PROBE.md``): the base model
reads plain text in both languages, does arithmetic stories only in A, sees only two quantity
verbs at work in B, is partly aligned across the languages by parallel sentences that avoid
the quantity verbs, and knows the ``question ... answer :`` format in both languages from
look-up questions. Specialists fine-tune shallowly and replay a quarter of the pretraining mix
so that their task vectors stay combinable.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from shoal.eval.task import Example
from shoal.zoo.languages import B_SEEN_VERBS, QUANTITY_VERBS, to_b
from shoal.zoo.stories import lookup_text, plain_sentence, plain_text, random_story, told_story
from shoal.zoo.tasks import get_zoo_task

Document = tuple[str, str]  # (prompt, completion); loss on the completion only
Source = Callable[[random.Random], Document]

# Specialist model name -> the task it is trained on.
SPECIALISTS: dict[str, str] = {"math": "math_a", "lang": "lang_b", "sort": "sort",
                               "count": "count"}
REPLAY_WEIGHT = 0.25


@dataclass(frozen=True)
class Component:
    """One weighted source of a mix."""

    name: str
    weight: float
    source: Source


Mix = Sequence[Component]


def _text(make: Callable[[random.Random], str]) -> Source:
    return lambda rng: ("", make(rng))


def _parallel(rng: random.Random) -> str:
    sentence = " ".join(plain_sentence(rng, quantity_verbs=False)
                        for _ in range(rng.randint(1, 2)))
    if rng.random() < 0.5:
        return f"{sentence} = {to_b(sentence)}"
    return f"{to_b(sentence)} = {sentence}"


def pretraining_mix() -> list[Component]:
    """What the base model reads."""
    all_verbs = tuple(QUANTITY_VERBS)
    return [
        Component("plain A", 0.15, _text(plain_text)),
        Component("plain B", 0.15, _text(lambda rng: to_b(plain_text(rng)))),
        Component("stories A", 0.35, _text(lambda rng: told_story(random_story(rng, all_verbs)))),
        Component("stories B (2 verbs)", 0.10,
                  _text(lambda rng: to_b(told_story(random_story(rng, B_SEEN_VERBS))))),
        Component("parallel A=B", 0.10, _text(_parallel)),
        Component("lookup A", 0.075, _text(lookup_text)),
        Component("lookup B", 0.075, _text(lambda rng: to_b(lookup_text(rng)))),
    ]


class _Cycle:
    """Examples in a reshuffled order each epoch, drawn with the caller's random generator."""

    def __init__(self, examples: Sequence[Example], *, full_text: bool) -> None:
        self._examples = list(examples)
        self._order: list[int] = []
        self._full_text = full_text

    def __call__(self, rng: random.Random) -> Document:
        if not self._order:
            self._order = list(range(len(self._examples)))
            rng.shuffle(self._order)
        example = self._examples[self._order.pop()]
        if self._full_text:
            return "", f"{example.prompt} {example.reference}"
        return example.prompt, example.reference


def _with_replay(components: list[Component]) -> list[Component]:
    replay = [Component(f"replay {c.name}", c.weight * REPLAY_WEIGHT, c.source)
              for c in pretraining_mix()]
    scale = (1.0 - REPLAY_WEIGHT) / sum(c.weight for c in components)
    return [Component(c.name, c.weight * scale, c.source) for c in components] + replay


def specialist_mix(specialist: str, seed: int, *, train_size: int | None = None) -> list[Component]:
    """The fine-tuning mix of ``specialist`` (a key of :data:`SPECIALISTS`)."""
    task = get_zoo_task(SPECIALISTS[specialist], seed)
    train = task.examples("train")
    if train_size is not None:
        train = train[:train_size]
    if specialist == "lang":
        # Next-token training on B: stories with every quantity verb (the new ones from the
        # task's train split, the two known ones freshly drawn) and plain B text. It never
        # sees the question/answer format in B.
        return _with_replay([
            Component("stories B (new verbs)", 0.25, _Cycle(train, full_text=True)),
            Component("stories B (2 verbs)", 0.15,
                      _text(lambda rng: to_b(told_story(random_story(rng, B_SEEN_VERBS))))),
            Component("plain B", 0.35, _text(lambda rng: to_b(plain_text(rng)))),
        ])
    return _with_replay([Component(task.name, 1.0, _Cycle(train, full_text=False))])


def documents(mix: Mix, rng: random.Random) -> Iterator[Document]:
    """An endless stream of documents drawn from ``mix`` by weight."""
    weights = [c.weight for c in mix]
    while True:
        (component,) = rng.choices(mix, weights=weights)
        yield component.source(rng)


def training_streams(seed: int) -> dict[str, Iterator[Document]]:
    """The document stream of every model of the world built with ``seed``, by model name
    (``base`` and each specialist), exactly as the build reads them."""
    streams = {"base": documents(pretraining_mix(), random.Random(f"pretrain:{seed}"))}
    for name in SPECIALISTS:
        streams[name] = documents(specialist_mix(name, seed), random.Random(f"specialist:{name}:{seed}"))
    return streams
