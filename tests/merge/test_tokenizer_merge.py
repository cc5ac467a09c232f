"""Merging models whose vocabularies differ (``tokenizer_source``, the ``tokenizer:`` block), through the CLI.

The tiny checkpoints are the goldens' (``tests/goldens/tiny_checkpoints.py``): vocabularies "a"
(32 tokens), "b" (24 of a's and 12 of its own) and "c" (20 of a's, 4 of b's own, 4 of its own).
The expected rows are computed here from the source files by the rules of
``shoal.merge.tokenizer_merge`` (mergekit's; the goldens compare against mergekit itself).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from shoal.cli.main import cli

GOLDENS = Path(__file__).resolve().parents[1] / "goldens"
MODELS = ("llama_base", "llama_a", "llama_vocab_b", "llama_vocab_c")


def _builder():  # type: ignore[no-untyped-def]
    name = "shoal_golden_tiny_checkpoints"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, GOLDENS / "tiny_checkpoints.py")
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[name] = module
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    return sys.modules[name]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vocab_ckpt")
    _builder().build_all(root, list(MODELS))
    return root


def _vocab(name: str) -> list[str]:
    builder = _builder()
    return builder.VOCABS[builder.CHECKPOINTS[name].vocab]


def _run(tmp: Path, recipe: dict, out: str = "out") -> "click.testing.Result":  # type: ignore[name-defined]  # noqa: F821
    path = tmp / f"{out}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return CliRunner().invoke(cli, ["merge", str(path), str(tmp / out), "--quiet"])


def _out_vocab(folder: Path) -> list[str]:
    data = json.loads((folder / "tokenizer.json").read_text())
    vocab = dict(data["model"]["vocab"])
    vocab.update({t["content"]: t["id"] for t in data["added_tokens"]})
    return [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]


def test_linear_over_three_vocabularies_aligns_rows_by_token(tmp_path: Path, ckpt: Path) -> None:
    weights = {"llama_a": 0.5, "llama_vocab_b": 0.3, "llama_vocab_c": 0.2}
    result = _run(tmp_path, {"merge_method": "linear", "dtype": "float32", "tokenizer_source": "union",
                             "models": [{"model": str(ckpt / m), "parameters": {"weight": w}} for m, w in weights.items()]})
    assert result.exit_code == 0, result.output
    vocab = _out_vocab(tmp_path / "out")
    # union: a's 32 tokens, then b's own (x0..x11), then c's own (y0..y3), each in id order
    assert vocab == _vocab("llama_a") + [f"x{i}" for i in range(12)] + [f"y{i}" for i in range(4)]
    got = load_file(tmp_path / "out" / "model.safetensors")
    src = {m: load_file(ckpt / m / "model.safetensors") for m in weights}
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        expected = []
        for token in vocab:
            having = {m: src[m][name][_vocab(m).index(token)].float() for m in weights if token in _vocab(m)}
            mean = sum(having.values()) / len(having)  # the row a model lacking the token takes
            rows = {m: having.get(m, mean) for m in weights}
            expected.append(sum(w * rows[m] for m, w in weights.items()) / sum(weights.values()))
        torch.testing.assert_close(got[name], torch.stack(expected), rtol=1e-6, atol=1e-7)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["vocab_size"] == len(vocab) == got["lm_head.weight"].shape[0]
    dry = CliRunner().invoke(cli, ["merge", str(tmp_path / "out.yaml"), str(tmp_path / "dry"), "--dry-run"])
    assert dry.exit_code == 0 and not (tmp_path / "dry").exists()
    assert ("vocabulary: 48 tokens, 48 rows; per-token tensors aligned by token: lm_head.weight, "
            "model.embed_tokens.weight") in dry.stdout


def test_the_output_loads_in_transformers_and_its_ids_index_the_rows(tmp_path: Path, ckpt: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = {"merge_method": "task_arithmetic", "base_model": str(ckpt / "llama_base"), "dtype": "float32",
              "models": [{"model": str(ckpt / "llama_vocab_b"), "parameters": {"weight": 1.0}},
                         {"model": str(ckpt / "llama_vocab_c"), "parameters": {"weight": 0.0}}],
              "tokenizer": {"source": "union", "pad_to_multiple_of": 16,
                            "tokens": {"<|im_start|>": {"source": {"kind": "zero"}},
                                       "w3": {"source": str(ckpt / "llama_vocab_c"), "force": True}}},
              "chat_template": "chatml"}
    result = _run(tmp_path, recipe)
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tokenizer("x3 y1 w5 w3 <|im_start|>", add_special_tokens=False)["input_ids"]
    vocab = _out_vocab(out)
    assert [vocab[i] for i in ids] == ["x3", "y1", "w5", "w3", "<|im_start|>"]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "x3"}], tokenize=False)
    assert prompt == "<|im_start|>user\nx3<|im_end|>\n"  # the recipe's template, beside the built tokenizer
    embed = model.get_input_embeddings().weight.detach()
    assert len(vocab) == 49 and embed.shape[0] == 64  # a's 32, x0-x11, y0-y3, <|im_start|>; padded to 16s
    b, c = (load_file(ckpt / m / "model.safetensors")["model.embed_tokens.weight"] for m in ("llama_vocab_b", "llama_vocab_c"))
    base = load_file(ckpt / "llama_base" / "model.safetensors")["model.embed_tokens.weight"]
    # weight 1 on b, 0 on c: b's task vector, where b lacks a token the base has, the base's row (no change)
    torch.testing.assert_close(embed[vocab.index("x3")], b[_vocab("llama_vocab_b").index("x3")].float())
    torch.testing.assert_close(embed[vocab.index("w25")], base[_vocab("llama_base").index("w25")].float())
    # forced: every model takes c's row of w3, so the task vector there is c's row minus itself = c's row
    torch.testing.assert_close(embed[vocab.index("w3")], c[_vocab("llama_vocab_c").index("w3")].float())
    assert not embed[vocab.index("<|im_start|>")].any()
    torch.testing.assert_close(embed[len(vocab):], embed[:len(vocab)].mean(0).expand(64 - len(vocab), -1))


@pytest.mark.parametrize(("change", "message"), [
    ({"tokenizer_source": "union", "tokenizer": {"source": "union"}}, "not both"),
    ({"tokenizer": {"source": "no/such/model"}}, "tokenizer source 'no/such/model' is neither"),
    ({"tokenizer": {"tokens": {"w1": {"source": "elsewhere"}}}}, "source model 'elsewhere' is not one of"),
    ({"tokenizer": {"tokens": {"w1": {"source": {"kind": "model_token", "model": "M", "token": "w1",
                                                  "token_id": 3}}}}}, "exactly one of 'token' or 'token_id'"),
    ({"tokenizer": {"pad_to_multiple_of": 0}}, "pad_to_multiple_of"),
    ({"tokenizer": {"tokens": {"w1": {"forse": True}}}}, "unknown key 'forse'"),
    ({"tokenizer": {"tokens": {"w1": {"source": {"kind": "model_token", "model": "M", "token": "nope"}, "force": True}}}},
     "token 'nope' is not in"),
])
def test_bad_tokenizer_settings_are_one_line_and_write_nothing(tmp_path: Path, ckpt: Path, change: dict,
                                                                message: str) -> None:
    model = str(ckpt / "llama_vocab_b")
    text = json.loads(json.dumps(change).replace('"M"', json.dumps(model)))
    recipe = {"merge_method": "linear", "parameters": {"weight": 0.5},
              "models": [{"model": str(ckpt / "llama_a")}, {"model": model}], **text}
    result = _run(tmp_path, recipe)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out.yaml"]  # no staging folder left either


def test_without_tokenizer_settings_differing_vocabularies_are_refused(tmp_path: Path, ckpt: Path) -> None:
    result = _run(tmp_path, {"merge_method": "linear", "parameters": {"weight": 0.5},
                             "models": [{"model": str(ckpt / "llama_a")}, {"model": str(ckpt / "llama_vocab_b")}]})
    assert result.exit_code == 2 and "shape mismatch" in result.stderr and not (tmp_path / "out").exists()
