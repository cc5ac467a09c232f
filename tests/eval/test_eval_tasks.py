"""Finding tasks by name, and tasks defined by JSONL files."""

from __future__ import annotations

import json

import pytest

from shoal.errors import TaskError
from shoal.eval import Task, get_task
from shoal.eval.jsonl_task import JsonlTask


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(TaskError) as info:
        get_task("no_such_task")
    message = str(info.value)
    assert "no_such_task" in message and "math_a" in message and "jsonl:" in message


def test_zoo_task_by_name():
    task = get_task("math_a", seed=1)
    assert isinstance(task, Task) and task.name == "math_a"
    assert task.examples("test") == get_task("math_a", seed=1).examples("test")
    assert task.examples("test") != get_task("math_a", seed=2).examples("test")


def test_jsonl_file_with_split_field(tmp_path):
    path = _write(tmp_path / "data.jsonl", [
        {"prompt": "two plus two", "target": "4"},
        {"prompt": "sort : b a", "target": "a b", "split": "fitness"},
        {"prompt": "three", "target": "3", "split": "test"},
    ])
    task = get_task(f"jsonl:{path}")
    assert isinstance(task, JsonlTask) and isinstance(task, Task)
    assert task.kind == "generate" and task.name == f"jsonl:{path}"
    assert [e.prompt for e in task.examples("test")] == ["two plus two", "three"]
    assert [e.target for e in task.examples("fitness")] == ["a b"]
    with pytest.raises(TaskError, match="no split 'validation'"):
        task.examples("validation")
    test = task.examples("test")
    assert task.score("the answer is 4 .", test[0]) == 1.0     # numeric target: number match
    assert task.score("5", test[0]) == 0.0
    fitness = task.examples("fitness")[0]
    assert task.score("a b", fitness) == 1.0 and task.score("a b c", fitness) == 0.0


def test_jsonl_folder_and_choices(tmp_path):
    folder = tmp_path / "mc"
    folder.mkdir()
    _write(folder / "test.jsonl", [{"prompt": "sky is", "target": "blue", "choices": ["red", "blue"]}])
    _write(folder / "validation.jsonl", [{"prompt": "grass is", "target": "green",
                                          "choices": ["green", "red"]}])
    task = get_task(f"jsonl:{folder}")
    assert task.kind == "choice"
    assert task.examples("test")[0].choices == ("red", "blue")
    assert task.score("blue", task.examples("test")[0]) == 1.0
    assert task.score("red", task.examples("test")[0]) == 0.0


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ('{"prompt": "a"}', "'target'"),
    ('{"prompt": "a", "target": "b", "answer": 1}', "unknown field"),
    ('{"prompt": "a", "target": "b", "split": "dev"}', "unknown split"),
    ('{"prompt": "a", "target": "b", "choices": ["c"]}', "not one of the choices"),
    ('[1, 2]', "JSON object"),
])
def test_jsonl_errors_name_the_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok", "target": "1"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(TaskError, match=message) as info:
        JsonlTask(path).examples("test")
    assert f"{path}:2" in str(info.value)


def test_jsonl_missing_path(tmp_path):
    with pytest.raises(TaskError, match="no such"):
        get_task(f"jsonl:{tmp_path / 'missing.jsonl'}")
