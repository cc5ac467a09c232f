"""``shoal eval`` end to end on a saved tiny model with a ``jsonl:`` task."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from shoal.cli.main import cli
from shoal.eval import evaluate, get_task, load_model

PROMPTS = ["one two three", "what is the answer ?", "red", "cat dog cat dog", "seven minus", "a blue"]


@pytest.fixture(scope="module")
def jsonl_task_path(saved_tiny_model, tmp_path_factory):
    # Targets: the model's own greedy answer for the first four prompts, a wrong one for the rest.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(saved_tiny_model).eval()
    tokenizer = AutoTokenizer.from_pretrained(saved_tiny_model)
    lines = []
    for i, prompt in enumerate(PROMPTS):
        encoded = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**encoded, do_sample=False, max_new_tokens=32)
        answer = tokenizer.decode(out[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
        lines.append({"prompt": prompt, "target": answer if i < 4 else "nine nine nine"})
    path = tmp_path_factory.mktemp("jsonl") / "task.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    return path


def test_shoal_eval_json(saved_tiny_model, jsonl_task_path, tmp_path):
    outputs = tmp_path / "outputs.jsonl"
    result = CliRunner().invoke(cli, ["eval", str(saved_tiny_model), "--task",
                                      f"jsonl:{jsonl_task_path}", "--json", "--batch-size", "4",
                                      "--outputs", str(outputs)])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert (record["n"], record["correct"], record["split"]) == (6, 4, "test")
    assert record["score"] == pytest.approx(4 / 6)
    model, tokenizer = load_model(saved_tiny_model)
    direct = evaluate(model, tokenizer, get_task(f"jsonl:{jsonl_task_path}"))
    assert record["score"] == direct.score and record["stderr"] == pytest.approx(direct.stderr)
    rows = [json.loads(line) for line in outputs.read_text().splitlines()]
    assert [r["output"] for r in rows] == list(direct.outputs)
    assert [r["score"] for r in rows] == [1.0] * 4 + [0.0] * 2


def test_shoal_eval_text_and_limit(saved_tiny_model, jsonl_task_path):
    result = CliRunner().invoke(cli, ["eval", str(saved_tiny_model), "--task",
                                      f"jsonl:{jsonl_task_path}", "--limit", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "(2/2)" in result.stdout and "2 examples" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--task", "no_such_task"], "unknown task 'no_such_task'"),
    (["--task", "JSONL", "--split", "validation"], "no split 'validation'"),
])
def test_shoal_eval_user_errors(saved_tiny_model, jsonl_task_path, args, message):
    args = [a.replace("JSONL", f"jsonl:{jsonl_task_path}") for a in args]
    result = CliRunner().invoke(cli, ["eval", str(saved_tiny_model), *args])
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_shoal_eval_missing_model(tmp_path, jsonl_task_path):
    missing = tmp_path / "nope"
    result = CliRunner().invoke(cli, ["eval", str(missing), "--task", f"jsonl:{jsonl_task_path}"])
    assert result.exit_code == 2
    assert str(missing) in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_zoo_worlds_model_is_scored_on_its_worlds_splits(micro_world, tmp_path):
    """Without --seed, the splits are those of the seed the model's world was built with."""
    import shutil

    from shoal.zoo.tasks import get_zoo_task

    root = tmp_path / "world1"
    shutil.copytree(micro_world.root, root)
    manifest = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**manifest, "seed": 1}))
    for seed_args, seed in (([], 1), (["--seed", "0"], 0)):
        outputs = tmp_path / f"out{seed}.jsonl"
        result = CliRunner().invoke(cli, ["eval", str(root / "count"), "--task", "count", "--limit", "5",
                                          "--json", "--outputs", str(outputs), *seed_args])
        assert result.exit_code == 0, result.output
        prompts = [json.loads(line)["prompt"] for line in outputs.read_text().splitlines()]
        assert prompts == [ex.prompt for ex in get_zoo_task("count", seed).examples("test")[:5]]
