"""Config updates, tokenizer / generation-config copies, and the model card."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from shoal.checkpoint import (
    RECIPE_FILENAME,
    copy_support_files,
    open_checkpoint,
    update_config,
    write_model_card,
)
from shoal.errors import CheckpointError

CHAT_TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"


def add_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "the a cat dog sat on mat".split()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)


@pytest.fixture
def source_with_tokenizer(tiny_model_dir, tmp_path) -> Path:
    folder = tmp_path / "source"
    shutil.copytree(tiny_model_dir("sf-qwen2", arch="qwen2"), folder)
    add_tokenizer(folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "max_new_tokens": 7}))
    return folder


def test_copy_support_files_updates_config_and_copies_tokenizer(source_with_tokenizer, tmp_path):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig, PreTrainedTokenizerFast

    out = tmp_path / "out"
    reader = open_checkpoint(source_with_tokenizer)
    copy_support_files(reader, out, config_updates={"torch_dtype": torch.bfloat16, "num_hidden_layers": 3,
                                                    "vocab_size": 128})
    source_config = json.loads((source_with_tokenizer / "config.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "torch_dtype" not in config
    assert config["num_hidden_layers"] == 3 and config["vocab_size"] == 128
    assert config["layer_types"] == ["full_attention"] * 3  # uniform list follows the layer count
    untouched = {k for k in source_config if k not in ("dtype", "num_hidden_layers", "vocab_size", "layer_types")}
    assert {k: config[k] for k in untouched} == {k: source_config[k] for k in untouched}

    loaded = AutoConfig.from_pretrained(out)
    assert (loaded.num_hidden_layers, loaded.vocab_size, loaded.dtype) == (3, 128, torch.bfloat16)
    assert GenerationConfig.from_pretrained(out).max_new_tokens == 7
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (out / name).read_bytes() == (source_with_tokenizer / name).read_bytes()
    text = "the cat sat on a mat"
    assert PreTrainedTokenizerFast.from_pretrained(out)(text).input_ids == [3, 5, 7, 8, 4, 9]
    tokenizer, original = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(source_with_tokenizer)
    assert tokenizer(text).input_ids == original(text).input_ids
    messages = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == "[user] hi\n"
    assert not (out / "model.safetensors").exists()  # weights are the writer's job


def test_copy_support_files_from_folder_without_config(tmp_path):
    source = tmp_path / "bare"
    source.mkdir()
    (source / "tokenizer.json").write_text("{}")
    copy_support_files(source, tmp_path / "out", config_updates={"dtype": "float16"})
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["tokenizer.json"]


def test_mixed_layer_types_are_dropped_and_rebuilt_by_transformers():
    from transformers import Gemma2Config

    config = Gemma2Config(num_hidden_layers=4, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8, vocab_size=96).to_dict()
    assert len(set(config["layer_types"])) == 2
    updated = update_config(config, {"num_hidden_layers": 3})
    assert "layer_types" not in updated and config["layer_types"]  # the input is not modified
    assert len(Gemma2Config(**updated).layer_types) == 3
    explicit = update_config(config, {"num_hidden_layers": 2, "layer_types": ["full_attention"] * 2})
    assert explicit["layer_types"] == ["full_attention"] * 2


def test_nested_updates_reach_text_config():
    config = {"model_type": "llava", "dtype": "float32",
              "text_config": {"num_hidden_layers": 2, "dtype": "float32", "layer_types": ["full_attention"] * 2}}
    updated = update_config(config, {"text_config.num_hidden_layers": 5, "dtype": "bfloat16"})
    assert updated["text_config"]["num_hidden_layers"] == 5
    assert updated["text_config"]["layer_types"] == ["full_attention"] * 5
    assert updated["dtype"] == updated["text_config"]["dtype"] == "bfloat16"
    assert "torch_dtype" not in updated and "torch_dtype" not in updated["text_config"]
    with pytest.raises(CheckpointError, match="vision_config"):
        update_config(config, {"vision_config.num_hidden_layers": 1})
    with pytest.raises(CheckpointError, match="float17"):
        update_config(config, {"dtype": "float17"})


def test_model_card_lists_sources_method_and_full_recipe(tmp_path):
    from huggingface_hub import ModelCard

    recipe = (
        "merge_method: ties\nbase_model: org/base\nmodels:\n"
        "  - model: org/math\n    parameters: {density: 0.5, weight: [0.1, 0.9]}\n"
        "  - model: ./local/coder\n# a comment with ``` fences inside\ndtype: bfloat16\n"
    )
    sources = ["org/base", "org/math", "./local/coder"]
    write_model_card(tmp_path, sources=sources, method="ties", recipe_yaml=recipe, base_model="org/base",
                     extra="Built for a test.")
    card = ModelCard.load(tmp_path / "README.md")
    assert set(card.data.tags) >= {"shoal", "merge"}
    assert card.data.base_model == ["org/base", "org/math"]  # local paths are not hub ids
    for source in sources:
        assert f"`{source}`" in card.text
    assert "`ties`" in card.text and "Built for a test." in card.text
    block = re.search(r"^(`{3,})yaml\n(.*?)\n\1$", card.text, flags=re.S | re.M)
    assert block is not None and block.group(2) + "\n" == recipe
    assert yaml.safe_load(block.group(2)) == yaml.safe_load(recipe)
    assert (tmp_path / RECIPE_FILENAME).read_text() == recipe


def test_the_deprecated_torch_dtype_is_renamed_and_loads_without_a_warning(tiny_model_dir, tmp_path, caplog):
    import logging

    from transformers import AutoConfig, AutoModelForCausalLM

    source = tmp_path / "old-style"
    shutil.copytree(tiny_model_dir("sf-llama-old", arch="llama"), source)
    config = json.loads((source / "config.json").read_text())
    config.pop("dtype", None)
    config["torch_dtype"] = "float32"
    config["text_config"] = {"torch_dtype": "float32", "hidden_size": 8}  # a nested section too
    (source / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    copy_support_files(source, out, config_updates={"torch_dtype": torch.bfloat16})
    written = json.loads((out / "config.json").read_text())
    assert written["dtype"] == written["text_config"]["dtype"] == "bfloat16"
    assert "torch_dtype" not in json.dumps(written)
    plain = update_config(config, {})
    assert plain["dtype"] == plain["text_config"]["dtype"] == "float32" and "torch_dtype" not in json.dumps(plain)

    written.pop("text_config")
    (out / "config.json").write_text(json.dumps(written))
    for name in ("model.safetensors",):
        shutil.copyfile(source / name, out / name)
    with caplog.at_level(logging.WARNING, logger="transformers"):
        loaded = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
        assert AutoConfig.from_pretrained(out).dtype == torch.bfloat16
        assert loaded.config.dtype == torch.bfloat16
    assert not [r for r in caplog.records if "torch_dtype" in r.getMessage()]
