"""The task protocol: examples per split, a prompt, and a scorer.

Every task has four disjoint splits: ``train`` (what specialists and experts learn from),
``fitness`` (what evolutionary search optimizes), ``validation`` (what picks the final
candidate) and ``test`` (reported only, never searched on).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, Sequence, runtime_checkable

SPLITS: tuple[str, ...] = ("train", "fitness", "validation", "test")
# Where an image goes in the prompt of an image example; the evaluator puts the processor's
# own image token there.
IMAGE_PLACEHOLDER = "<image>"
Split = Literal["train", "fitness", "validation", "test"]


@dataclass(frozen=True)
class Example:
    """One evaluation example.

    For generation tasks ``target`` is the gold answer that the scorer compares the extracted
    answer with. For multiple-choice tasks ``choices`` are the continuations scored by
    log-likelihood and ``target`` is the correct one (an element of ``choices``).
    ``completion`` is the full reference continuation of ``prompt`` used for next-token
    training (e.g. ``" 7 ."``); it defaults to the target.

    ``images`` (optional) are the pictures an image task's prompt talks about, one per
    :data:`IMAGE_PLACEHOLDER` in ``prompt``, in any form the model's processor accepts (e.g.
    ``(H, W, 3)`` uint8 arrays). They take no part in comparing or hashing examples.
    """

    prompt: str
    target: str
    choices: tuple[str, ...] | None = None
    completion: str | None = None
    images: tuple[Any, ...] | None = field(default=None, compare=False, repr=False)

    @property
    def reference(self) -> str:
        return self.completion if self.completion is not None else self.target


@runtime_checkable
class Task(Protocol):
    """What shoal needs to know about a task.

    A generate task may also have ``stop_strings: tuple[str, ...]``: generation of an answer
    stops at the first of them, and the answer is cut before it (optional; none by default).
    """

    name: str
    kind: Literal["generate", "choice"]
    max_new_tokens: int  # generation budget (generate tasks)

    def examples(self, split: str) -> Sequence[Example]:
        """The examples of one split, in a fixed order. Unknown split: TaskError."""
        ...

    def score(self, output: str, example: Example) -> float:
        """1.0 for a correct answer, 0.0 otherwise (or partial credit in [0, 1])."""
        ...
