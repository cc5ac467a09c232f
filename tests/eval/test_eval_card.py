"""The score matrix over several models and tasks."""

from __future__ import annotations

import json

import pytest

from shoal.eval import evaluate, get_task, load_model
from shoal.eval.card import score_matrix


@pytest.fixture(scope="module")
def two_models(saved_tiny_model, llama_factory, word_tokenizer, tmp_path_factory):
    other = tmp_path_factory.mktemp("card") / "other"
    llama_factory(seed=7).save_pretrained(other)
    word_tokenizer.save_pretrained(other)
    return {"first": saved_tiny_model, "second": other}


def test_score_matrix_cells_equal_single_evaluations(two_models, tmp_path):
    gen = tmp_path / "gen.jsonl"
    gen.write_text("".join(json.dumps({"prompt": p, "target": t}) + "\n" for p, t in
                           [("one two", "three"), ("red", "blue"), ("cat", "dog")]))
    mc = tmp_path / "mc.jsonl"
    mc.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "sky is", "target": "blue", "choices": ["red", "blue"]},
        {"prompt": "one two", "target": "three", "choices": ["three", "cat", "no"]}]))
    tasks = [f"jsonl:{gen}", get_task(f"jsonl:{mc}")]
    events = []
    matrix = score_matrix(two_models, tasks, "test", batch_size=2,
                          progress=lambda s, d, t: events.append((s, d, t)))
    assert matrix.models == ("first", "second")
    assert matrix.tasks == (f"jsonl:{gen}", f"jsonl:{mc}")
    for name, folder in two_models.items():
        model, tokenizer = load_model(folder)
        for task_name in matrix.tasks:
            expected = evaluate(model, tokenizer, get_task(task_name))
            assert matrix.result(name, task_name) == expected
    assert matrix.counts() == {f"jsonl:{gen}": 3, f"jsonl:{mc}": 2}
    table = matrix.markdown()
    assert f"jsonl:{gen} (n=3)" in table and table.count("\n") == 3
    assert len(matrix.as_records()) == 4
    assert events[-1] == ("score matrix", 4, 4)
