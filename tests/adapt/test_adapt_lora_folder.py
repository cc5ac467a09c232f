"""The LoRA baseline's adapter folder loads with PEFT as PEFT users load adapters, and with
`shoal eval ADAPTER` through shoal's one loader."""

from __future__ import annotations

import json

import pytest
import torch
from adapt_toys import load
from click.testing import CliRunner

from shoal.cli.main import cli
from shoal.studies.lora_baseline import train_lora

PROMPTS = ["ay : c d e =", "ay : f g h =", "bee : i j c ="]


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, word_tokenizer, toy_tasks, tmp_path_factory):
    pytest.importorskip("peft")
    base_dir = tiny_model_dir("adapt-llama", "llama", seed=1)
    model = load(base_dir)
    out = tmp_path_factory.mktemp("lora-folder") / "adapter"
    train_lora(model, word_tokenizer, toy_tasks["ay"], out=out, rank=4, lr=1e-2, steps=6, batch_size=16,
               eval_every=3, validation_limit=8)
    return {"base": base_dir, "out": out, "model": model}


def _logits(model, tokenizer):
    batch = tokenizer(PROMPTS[:1], return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=batch["input_ids"]).logits


def test_adapter_folder_names_its_task_type_base_and_tokenizer(adapter, word_tokenizer):
    config = json.loads((adapter["out"] / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == str(adapter["base"])
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(adapter["out"])
    assert saved(PROMPTS)["input_ids"] == word_tokenizer(PROMPTS)["input_ids"]


def test_peft_users_load_the_folder_alone(adapter, word_tokenizer):
    from peft import AutoPeftModelForCausalLM, PeftModel

    loaded = AutoPeftModelForCausalLM.from_pretrained(str(adapter["out"])).eval()  # base from the config
    expected = PeftModel.from_pretrained(load(adapter["base"]), str(adapter["out"])).eval()
    assert torch.allclose(_logits(loaded, word_tokenizer), _logits(expected, word_tokenizer), atol=1e-6)
    assert not torch.allclose(_logits(loaded, word_tokenizer), _logits(adapter["model"], word_tokenizer),
                              atol=1e-4)  # the adapter does change the model


def test_shoal_loader_and_cli_evaluate_the_adapter(adapter, word_tokenizer, tmp_path):
    from peft import PeftModel

    from shoal.eval import evaluate, get_task, load_model

    model, tokenizer = load_model(adapter["out"])
    expected = PeftModel.from_pretrained(load(adapter["base"]), str(adapter["out"])).eval()
    assert torch.allclose(_logits(model, tokenizer), _logits(expected, word_tokenizer), atol=1e-5)

    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "target": t}) + "\n"
                            for p, t in zip(PROMPTS, ["a", "a", "b"])), encoding="utf-8")
    task = get_task(f"jsonl:{data}")
    direct = evaluate(expected, word_tokenizer, task, "test")
    result = CliRunner().invoke(cli, ["eval", str(adapter["out"]), "--task", f"jsonl:{data}", "--json",
                                      "--quiet"], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert (record["score"], record["n"]) == (direct.score, 3)


def test_an_adapter_whose_base_is_gone_is_one_line(adapter, tmp_path):
    import shutil

    moved = tmp_path / "orphan"
    shutil.copytree(adapter["out"], moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "no-such-base")
    (moved / "adapter_config.json").write_text(json.dumps(config))
    data = tmp_path / "toy.jsonl"
    data.write_text(json.dumps({"prompt": PROMPTS[0], "target": "a"}) + "\n", encoding="utf-8")
    result = CliRunner().invoke(cli, ["eval", str(moved), "--task", f"jsonl:{data}", "--quiet"])
    assert result.exit_code == 2 and "no-such-base" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
