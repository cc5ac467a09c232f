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


# -- lm-eval both ways: local task folders by name, and `--model shoal` ----------------------

def _mc_task_folder(root, model, tokenizer, name="shoal_local_mc"):
    """A task folder with one multiple-choice task whose answers are right for every other
    question (the model's own choice) and wrong for the rest."""
    options = [["one", "two", "three"], ["red", "cat dog"], ["yes", "no", "blue"]]
    rows = []
    for i, question in enumerate(QUESTIONS):
        choices = options[i % len(options)]
        scores = [_loglik(model, tokenizer, question, " " + c) for c in choices]
        best = max(range(len(choices)), key=scores.__getitem__)
        rows.append({"question": question, "options": choices,
                     "label": best if i % 2 else (best + 1) % len(choices)})
    folder = root / "tasks"
    folder.mkdir(parents=True, exist_ok=True)
    data = _jsonl(folder / "mc.jsonl", rows)
    (folder / f"{name}.yaml").write_text(f"""
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {root / "cache"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_target: label
doc_to_choice: "{{{{options}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""", encoding="utf-8")
    return folder, name


def test_a_local_task_folder_is_found_by_name(offline, monkeypatch, tiny_llama, word_tokenizer):
    from shoal.eval.lmeval_adapter import INCLUDE_PATH_ENV, lmeval_task

    folder, name = _mc_task_folder(offline, tiny_llama, word_tokenizer)
    monkeypatch.setenv(INCLUDE_PATH_ENV, str(folder))
    task = get_task(f"lmeval:{name}")
    assert task.name == f"lmeval:{name}" and len(task.examples("test")) == len(QUESTIONS)
    result = evaluate(tiny_llama, word_tokenizer, task, "test", batch_size=4)
    assert (result.n, result.correct) == (len(QUESTIONS), 3)
    monkeypatch.delenv(INCLUDE_PATH_ENV)
    assert lmeval_task(name, include_path=folder).name == f"lmeval:{name}"
    monkeypatch.setenv(INCLUDE_PATH_ENV, str(offline / "nowhere"))
    with pytest.raises(TaskError, match=f"nowhere: no such lm-eval task folder \\(from {INCLUDE_PATH_ENV}\\)"):
        get_task(f"lmeval:{name}")


def test_stderr_is_lm_evals_mean_stderr():
    from lm_eval.api.metrics import mean_stderr as lmeval_mean_stderr

    from shoal.eval.evaluate import result_from_scores
    from shoal.eval.scoring import mean_stderr

    for scores in ([1.0, 0.0, 1.0, 1.0], [0.0] * 7 + [1.0] * 3, [0.25, 0.5, 1.0, 0.0, 0.75]):
        assert mean_stderr(scores) == pytest.approx(lmeval_mean_stderr(scores), rel=1e-12)
        assert result_from_scores("t", "test", [], scores).stderr == pytest.approx(lmeval_mean_stderr(scores))
    p, n = 0.3, 10  # 0/1 scores: sqrt(p (1 - p) / (n - 1)), not / n
    assert mean_stderr([0.0] * 7 + [1.0] * 3) == pytest.approx((p * (1 - p) / (n - 1)) ** 0.5)
    assert mean_stderr([1.0]) == 0.0 and mean_stderr([]) == 0.0


def _layer_path_folder(root, llama_factory, tokenizer):
    from shoal.flow.build import build_path_model, save_path_model
    from shoal.flow.path import make_path

    sources = []
    for seed in (3, 4):
        folder = root / f"src{seed}"
        llama_factory(seed=seed).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        sources.append(folder)
    model = build_path_model(sources, make_path([(0, 0), (1, 1, 0.8), (1, 0), (0, 1)]))
    return save_path_model(model, root / "path_model")


def test_lmeval_evaluates_shoal_models_by_name(offline, saved_tiny_model, llama_factory, word_tokenizer):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from shoal.eval import load_model
    from shoal.eval.lmeval_adapter import lmeval_task, register_lmeval_model

    register_lmeval_model()
    register_lmeval_model()  # twice is harmless
    from lm_eval.api.registry import get_model

    assert get_model("shoal").__name__ == "ShoalLM" and get_model("hf").__name__ == "HFLM"
    path_model = _layer_path_folder(offline, llama_factory, word_tokenizer)
    for folder in (saved_tiny_model, path_model):
        model, tokenizer = load_model(folder)
        tasks, name = _mc_task_folder(offline / folder.name, model, tokenizer)
        out = lm_eval.simple_evaluate(model="shoal", model_args=f"pretrained={folder}", tasks=[name],
                                      task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
                                      batch_size=2)
        metrics = out["results"][name]
        ours = evaluate(model, tokenizer, lmeval_task(name, include_path=tasks), "test")
        assert ours.correct == 3
        assert metrics["acc,none"] == pytest.approx(ours.score)
        assert metrics["acc_stderr,none"] == pytest.approx(ours.stderr)  # n - 1, as lm-eval


def test_shoal_lm_eval_command_runs_lm_evals_cli(offline, tmp_path, llama_factory, word_tokenizer):
    import subprocess
    import sys

    from shoal.eval import load_model

    path_model = _layer_path_folder(tmp_path, llama_factory, word_tokenizer)
    model, tokenizer = load_model(path_model)
    tasks, name = _mc_task_folder(tmp_path, model, tokenizer)
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, "-m", "shoal.cli.lm_eval", "--model", "shoal", "--model_args",
                           f"pretrained={path_model}", "--tasks", name, "--include_path", str(tasks),
                           "--output_path", str(out), "--batch_size", "2"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    assert results["results"][name]["acc,none"] == pytest.approx(0.5)
