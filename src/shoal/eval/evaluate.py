"""Score a model on one split of a task."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from shoal.errors import TaskError
from shoal.eval.generation import generate_greedy
from shoal.eval.loglik import loglik
from shoal.eval.scoring import mean_stderr
from shoal.eval.task import Example, Task
from shoal.progress import ProgressFn


@dataclass(frozen=True)
class EvalResult:
    """The outcome of one evaluation.

    ``score`` is the mean per-example score; ``correct`` counts the examples that scored 1.0;
    ``stderr`` is the standard error of the mean as lm-eval computes it (sample standard
    deviation, divisor ``n - 1``, over ``sqrt(n)``; ``sqrt(score (1 - score) / (n - 1))`` for
    0/1 scores). ``outputs`` are
    the generated continuations (generate tasks) or the chosen choices (choice tasks), in
    example order.
    """

    task: str
    split: str
    score: float
    n: int
    correct: int
    stderr: float
    outputs: tuple[str, ...]
    scores: tuple[float, ...]

    def summary(self) -> str:
        return (f"{self.task} [{self.split}]: {100 * self.score:.1f}% ± {100 * self.stderr:.1f} "
                f"({self.correct}/{self.n})")


def task_stop_strings(task: Task) -> tuple[str, ...]:
    """The strings that end a generated answer: the task's optional ``stop_strings``."""
    return tuple(getattr(task, "stop_strings", None) or ())


def select_examples(task: Task, split: str, limit: int | None = None) -> Sequence[Example]:
    """The first ``limit`` examples of ``split`` (all of them when ``limit`` is None)."""
    if limit is not None and limit < 1:
        raise TaskError(f"limit must be a positive number of examples, got {limit}")
    examples = task.examples(split)
    if limit is not None:
        examples = examples[:limit]
    if len(examples) == 0:
        raise TaskError(f"task {task.name!r} has no examples in split {split!r}")
    return examples


def predict(model: Any, tokenizer: Any, task: Task, examples: Sequence[Example], *,
            batch_size: int = 64, progress: ProgressFn | None = None) -> list[str]:
    """The model's answer to each example: its greedy continuation (generate tasks) or the
    choice with the highest log-likelihood (choice tasks). Examples that carry images are
    answered through the model's processor (``tokenizer`` is then the processor)."""
    if task.kind == "generate" and any(e.images for e in examples):
        from shoal.eval.vision import generate_with_images

        return generate_with_images(model, tokenizer, examples, max_new_tokens=task.max_new_tokens,
                                    batch_size=batch_size, stop_strings=task_stop_strings(task),
                                    progress=progress)
    if task.kind == "generate":
        return generate_greedy(model, tokenizer, [e.prompt for e in examples],
                               max_new_tokens=task.max_new_tokens, batch_size=batch_size,
                               stop_strings=task_stop_strings(task), progress=progress)
    if task.kind == "choice":
        contexts: list[str] = []
        continuations: list[str] = []
        for example in examples:
            if not example.choices:
                raise TaskError(f"task {task.name!r}: a choice example has no choices "
                                f"(prompt {example.prompt[:40]!r})")
            contexts.extend([example.prompt] * len(example.choices))
            continuations.extend(example.choices)
        scores = loglik(model, tokenizer, contexts, continuations, batch_size=batch_size,
                        progress=progress)
        answers = []
        at = 0
        for example in examples:
            assert example.choices is not None
            block = scores[at:at + len(example.choices)]
            answers.append(example.choices[max(range(len(block)), key=block.__getitem__)])
            at += len(block)
        return answers
    raise TaskError(f"task {task.name!r} has unknown kind {task.kind!r}; "
                    "expected 'generate' or 'choice'")


def evaluate(model: Any, tokenizer: Any, task: Task, split: str = "test", *,
             limit: int | None = None, batch_size: int = 64,
             progress: ProgressFn | None = None) -> EvalResult:
    """Score ``model`` on ``split`` of ``task`` (the first ``limit`` examples when given)."""
    examples = select_examples(task, split, limit)
    outputs = predict(model, tokenizer, task, examples, batch_size=batch_size, progress=progress)
    scores = tuple(float(task.score(out, ex)) for out, ex in zip(outputs, examples))
    return result_from_scores(task.name, split, outputs, scores)


def result_from_scores(task: str, split: str, outputs: Sequence[str],
                       scores: Sequence[float]) -> EvalResult:
    """An :class:`EvalResult` from per-example outputs and scores."""
    n = len(scores)
    mean = sum(scores) / n if n else 0.0
    stderr = mean_stderr(scores)
    return EvalResult(task=task, split=split, score=mean, n=n,
                      correct=sum(1 for s in scores if s >= 1.0), stderr=stderr,
                      outputs=tuple(outputs), scores=tuple(scores))
