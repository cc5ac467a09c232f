"""Zoo tasks: split sizes and disjointness, determinism, answers checked by a reference."""

from __future__ import annotations

import re

import pytest

from shoal.errors import TaskError
from shoal.eval.task import SPLITS, Task
from shoal.zoo.languages import B_HIDDEN_VERBS, to_a
from shoal.zoo.tasks import EVAL_SPLIT_SIZE, TRAIN_SPLIT_SIZE, ZOO_TASKS, get_zoo_task

TASKS = sorted(ZOO_TASKS)


@pytest.mark.parametrize("name", TASKS)
def test_splits_have_their_sizes_and_share_no_prompt(name: str) -> None:
    task = get_zoo_task(name, seed=3)
    assert isinstance(task, Task)
    prompts = {split: [e.prompt for e in task.examples(split)] for split in SPLITS}
    for split, items in prompts.items():
        expected = TRAIN_SPLIT_SIZE if split == "train" else EVAL_SPLIT_SIZE
        assert len(items) == expected >= 500
        assert len(set(items)) == len(items), f"duplicate prompt inside {split}"
    for i, first in enumerate(SPLITS):
        for second in SPLITS[i + 1:]:
            assert not set(prompts[first]) & set(prompts[second]), (first, second)


@pytest.mark.parametrize("name", TASKS)
def test_generation_is_fixed_by_the_seed(name: str) -> None:
    same = [get_zoo_task(name, seed=5).examples("test")[:50] for _ in range(2)]
    other = get_zoo_task(name, seed=6).examples("test")[:50]
    assert same[0] == same[1]
    assert [e.prompt for e in other] != [e.prompt for e in same[0]]


def _reference_answer(name: str, prompt: str) -> str:
    """Solve a prompt independently of the generators."""
    if name in ("math_a", "math_b", "lang_b"):
        text = to_a(prompt) if name != "math_a" else prompt
        match = re.match(r"(\w+) has (\d+) (\w+) \. \1 (\w+) (\d+) \3 \.", text)
        assert match, text
        start, verb, amount = int(match[2]), match[4], int(match[5])
        sign = 1 if verb in ("buys", "finds", "gets", "makes") else -1
        if name != "math_a":
            assert verb in B_HIDDEN_VERBS
        return str(start + sign * amount)
    words = prompt.split(":", 1)[1].rstrip("=").split()
    if name == "count":
        return str(len(words))
    if name == "max":
        return str(max(int(w) for w in words))
    assert words != sorted(words, key=int)
    return " ".join(str(n) for n in sorted(int(w) for w in words))


@pytest.mark.parametrize("name", TASKS)
def test_targets_match_an_independent_solution_and_score(name: str) -> None:
    task = get_zoo_task(name)
    for example in task.examples("validation")[:200]:
        assert example.target == _reference_answer(name, example.prompt)
        assert task.score(" " + example.reference + " tom has", example) == 1.0
        assert task.score(" 1000 .", example) == 0.0
        assert task.score("", example) == 0.0


def test_scoring_reads_the_first_answer_only() -> None:
    math = get_zoo_task("math_a")
    example = math.examples("test")[0]
    wrong = str(int(example.target) + 1)
    assert math.score(f" {wrong} {example.target} .", example) == 0.0
    sort = get_zoo_task("sort")
    example = sort.examples("test")[0]
    assert sort.score(f" {example.target} 7 .", example) == 0.0
    assert sort.score(f" {example.target}", example) == 1.0


def test_unknown_names_are_task_errors() -> None:
    with pytest.raises(TaskError, match="math_a"):
        get_zoo_task("nope")
    with pytest.raises(TaskError, match="dev"):
        get_zoo_task("math_a").examples("dev")
