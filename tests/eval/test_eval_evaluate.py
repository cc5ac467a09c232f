"""``evaluate`` on toy generation and multiple-choice tasks."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch

from shoal.errors import TaskError
from shoal.eval import EvalResult, Example, Task, evaluate, loglik
from shoal.eval.scoring import exact_match

PROMPTS = ["one two three", "what is the answer ?", "red", "cat dog cat dog", "seven minus",
           "a blue", "yes no", "ten nine eight seven six"]


@dataclass(frozen=True)
class ToyTask:
    """A task held in memory: every split is the same list of examples."""

    name: str
    kind: str
    items: tuple[Example, ...]
    max_new_tokens: int = 4
    stop_strings: tuple[str, ...] = field(default=())

    def examples(self, split: str):
        if split not in ("train", "fitness", "validation", "test"):
            raise TaskError(f"no split {split!r}")
        return self.items

    def score(self, output: str, example: Example) -> float:
        if self.kind == "choice":
            return float(output == example.target)
        return exact_match(output, example.target)


def _greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    encoded = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**encoded, do_sample=False, max_new_tokens=max_new_tokens)
    return tokenizer.decode(out[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)


def test_generate_task_counts_and_stderr(tiny_llama, word_tokenizer):
    # Targets are the model's own greedy answers for the first five prompts and a wrong
    # answer for the other three: 5 of 8 correct.
    answers = [_greedy(tiny_llama, word_tokenizer, p, 4) for p in PROMPTS]
    items = tuple(Example(p, a if i < 5 else a + " nope") for i, (p, a) in enumerate(zip(PROMPTS, answers)))
    task = ToyTask("toy-gen", "generate", items)
    assert isinstance(task, Task)
    result = evaluate(tiny_llama, word_tokenizer, task, "test", batch_size=3)
    assert isinstance(result, EvalResult)
    assert (result.task, result.split, result.n, result.correct) == ("toy-gen", "test", 8, 5)
    assert result.score == pytest.approx(5 / 8)
    assert result.stderr == pytest.approx(math.sqrt((5 / 8) * (3 / 8) / (8 - 1)))  # n - 1, as lm-eval
    assert list(result.outputs) == answers
    assert result.scores == (1.0,) * 5 + (0.0,) * 3

    limited = evaluate(tiny_llama, word_tokenizer, task, "validation", limit=3)
    assert (limited.n, limited.correct, limited.score, limited.stderr) == (3, 3, 1.0, 0.0)


def test_choice_task_predicts_the_most_likely_choice(tiny_llama, word_tokenizer):
    choice_sets = [("one", "two", "three"), ("red blue", "cat"), ("yes", "no", "dog .", "ten")]
    items = []
    expected_correct = 0
    for i, prompt in enumerate(PROMPTS):
        choices = choice_sets[i % len(choice_sets)]
        scores = [_one_loglik(tiny_llama, word_tokenizer, prompt, c) for c in choices]
        best = choices[max(range(len(choices)), key=scores.__getitem__)]
        # Even examples name the most likely choice as the target, odd ones another choice.
        target = best if i % 2 == 0 else next(c for c in choices if c != best)
        expected_correct += target == best
        items.append(Example(prompt, target, choices=choices))
    task = ToyTask("toy-choice", "choice", tuple(items))
    result = evaluate(tiny_llama, word_tokenizer, task, batch_size=4)
    assert result.n == len(PROMPTS) and result.correct == expected_correct == 4
    assert result.score == pytest.approx(0.5)
    for example, output in zip(items, result.outputs):
        assert output in example.choices


def _one_loglik(model, tokenizer, context: str, continuation: str) -> float:
    ids = tokenizer(context)["input_ids"]
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids + cont])).logits[0]
    log_probs = torch.log_softmax(logits, -1)
    return sum(float(log_probs[len(ids) - 1 + k, t]) for k, t in enumerate(cont))


def test_loglik_helper_agrees_with_test_reference(tiny_llama, word_tokenizer):
    got = loglik(tiny_llama, word_tokenizer, ["red", "a blue"], ["cat", "yes no"])
    assert got == pytest.approx([_one_loglik(tiny_llama, word_tokenizer, "red", "cat"),
                                 _one_loglik(tiny_llama, word_tokenizer, "a blue", "yes no")],
                                abs=1e-4)


def test_bad_uses_raise_task_errors(tiny_llama, word_tokenizer):
    task = ToyTask("toy", "generate", (Example("one", "two"),))
    with pytest.raises(TaskError, match="no split"):
        evaluate(tiny_llama, word_tokenizer, task, "dev")
    with pytest.raises(TaskError, match="limit"):
        evaluate(tiny_llama, word_tokenizer, task, limit=0)
    with pytest.raises(TaskError, match="no examples"):
        evaluate(tiny_llama, word_tokenizer, ToyTask("empty", "generate", ()))
    with pytest.raises(TaskError, match="kind"):
        evaluate(tiny_llama, word_tokenizer, ToyTask("odd", "rank", (Example("one", "two"),)))
    with pytest.raises(TaskError, match="no choices"):
        evaluate(tiny_llama, word_tokenizer, ToyTask("c", "choice", (Example("one", "two"),)))
