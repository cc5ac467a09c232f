"""The lm-eval adapter, offline, on tasks defined in a local YAML over local JSONL files."""

from __future__ import annotations

import json

import pytest
import torch

from shoal.errors import TaskError
from shoal.eval import Task, evaluate, get_task

QUESTIONS = ["one two", "red blue green", "what is the answer", "cat", "seven minus two", "yes no yes"]
UNTIL = [";", "end"]


def _greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    encoded = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**encoded, do_sample=False, max_new_tokens=max_new_tokens)
    text = tokenizer.decode(out[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
    cuts = [text.find(u) for u in UNTIL if u in text]
    return text[:min(cuts)] if cuts else text


def _loglik(model, tokenizer, context: str, continuation: str) -> float:
    ids = tokenizer(context)["input_ids"]
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=torch.tensor([ids + cont])).logits[0], -1)
    return sum(float(log_probs[len(ids) - 1 + k, t]) for k, t in enumerate(cont))


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture()
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    pytest.importorskip("lm_eval")
    return tmp_path


def test_generate_until_task(offline, tiny_llama, word_tokenizer):
    # Targets: the model's own answer for the first four questions, a wrong one for the rest.
    answers = [_greedy(tiny_llama, word_tokenizer, f"Q: {q} A:", 6) for q in QUESTIONS]
    rows = [{"question": q, "answer": a if i < 4 else "zero zero zero"}
            for i, (q, a) in enumerate(zip(QUESTIONS, answers))]
    data = _jsonl(offline / "gen.jsonl", rows)
    train = _jsonl(offline / "train.jsonl", [{"question": "nine", "answer": "ten"}])
    yaml_path = offline / "toy_gen.yaml"
    yaml_path.write_text(f"""
task: shoal_toy_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
    train: {train}
  cache_dir: {offline / "cache"}
test_split: test
training_split: train
output_type: generate_until
doc_to_text: "Q: {{{{question}}}} A:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: {json.dumps(UNTIL)}
  max_gen_toks: 6
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""", encoding="utf-8")
    task = get_task(f"lmeval:{yaml_path}")
    assert isinstance(task, Task)
    assert (task.name, task.kind, task.max_new_tokens) == ("lmeval:shoal_toy_gen", "generate", 6)
    assert tuple(task.stop_strings) == tuple(UNTIL)
    assert [e.prompt for e in task.examples("test")] == [f"Q: {q} A:" for q in QUESTIONS]
    assert task.examples("fitness")[0].target == "ten"
    with pytest.raises(TaskError, match="no split 'validation'"):
        task.examples("validation")

    result = evaluate(tiny_llama, word_tokenizer, task, "test", batch_size=4)
    assert list(result.outputs) == answers
    assert (result.n, result.correct) == (6, 4)
    assert result.score == pytest.approx(4 / 6)


def test_filters_and_metric_of_the_task(offline):
    data = _jsonl(offline / "num.jsonl", [{"question": "two plus three", "answer": "5"}])
    yaml_path = offline / "toy_num.yaml"
    yaml_path.write_text(f"""
task: shoal_toy_num
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {offline / "cache"}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}} A:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
metric_list:
  - metric: exact_match
filter_list:
  - name: get-number
    filter:
      - function: regex
        regex_pattern: "(-?[0-9]+)"
      - function: take_first
""", encoding="utf-8")
    task = get_task(f"lmeval:{yaml_path}")
    example = task.examples("test")[0]
    assert task.max_new_tokens == 256  # lm-eval's default budget
    assert task.score("the answer is 5 apples", example) == 1.0   # regex filter extracts 5
    assert task.score("6", example) == 0.0
    assert task.score("no number", example) == 0.0


def test_multiple_choice_task(offline, tiny_llama, word_tokenizer):
    options = [["one", "two", "three"], ["red", "cat dog"], ["yes", "no", "blue"]]
    rows, expected = [], 0
    for i, question in enumerate(QUESTIONS):
        choices = options[i % len(options)]
        scores = [_loglik(tiny_llama, word_tokenizer, question, " " + c) for c in choices]
        best = max(range(len(choices)), key=scores.__getitem__)
        label = best if i % 3 else (best + 1) % len(choices)  # every third one is wrong
        expected += label == best
        rows.append({"question": question, "options": choices, "label": label})
    data = _jsonl(offline / "mc.jsonl", rows)
    yaml_path = offline / "toy_mc.yaml"
    yaml_path.write_text(f"""
task: shoal_toy_mc
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
  cache_dir: {offline / "cache"}
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_target: label
doc_to_choice: "{{{{options}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""", encoding="utf-8")
    task = get_task(f"lmeval:{yaml_path}")
    assert task.kind == "choice"
    first = task.examples("test")[0]  # no test split: the validation documents are evaluated
    assert first.choices == (" one", " two", " three") and first.prompt == QUESTIONS[0]
    result = evaluate(tiny_llama, word_tokenizer, task, "test", batch_size=5)
    assert (result.n, result.correct) == (len(QUESTIONS), expected) and expected == 4


def test_unknown_lmeval_inputs(offline):
    with pytest.raises(TaskError, match="no such lm-eval task file"):
        get_task(f"lmeval:{offline / 'missing.yaml'}")
    bad = offline / "bad.yaml"
    bad.write_text("dataset_path: json\n", encoding="utf-8")
    with pytest.raises(TaskError, match="no 'task' name"):
        get_task(f"lmeval:{bad}")


def test_groups_are_refused_with_their_members(offline):
    data = _jsonl(offline / "d.jsonl", [{"question": "one", "answer": "two"}])
    for name in ("shoal_member_a", "shoal_member_b"):
        (offline / f"{name}.yaml").write_text(f"""
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {offline / "cache"}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: exact_match
""", encoding="utf-8")
    group = offline / "group.yaml"
    group.write_text("group: shoal_toy_group\ntask:\n  - shoal_member_a\n  - shoal_member_b\n",
                     encoding="utf-8")
    with pytest.raises(TaskError, match="group of 2 tasks") as info:
        get_task(f"lmeval:{group}")
    assert "shoal_member_a" in str(info.value) and "shoal_member_b" in str(info.value)
