"""Saving a layer-path model as a Hugging Face folder and loading it with AutoModelForCausalLM."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import torch
from safetensors import safe_open

import shoal  # noqa: F401  (registers the architecture)
from shoal.flow.build import build_path_model, save_path_model, write_path_model
from shoal.flow.path import identity_path, make_path

PATH = [(0, 0), (1, 1, 0.75), (0, 1), (1, 1, 1.25), (0, 2)]


def stored_tensor_names(folder):
    names = []
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            names.extend(handle.keys())
    return names


def test_save_then_auto_load_gives_the_same_logits(word_sources, word_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a, b = word_sources
    model = build_path_model([a, b], make_path(PATH))
    out = save_path_model(model, tmp_path / "path_model")
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(loaded).__name__ == "LayerPathForCausalLM"
    assert loaded.path == model.path
    enc = word_tokenizer(["what is two plus two ?", "cat dog"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(loaded(**enc).logits, model(**enc).logits)
    # each distinct layer once: (0,0), (1,1), (0,1), (0,2) -> 4 blocks of 9 tensors, plus 3 outside
    names = stored_tensor_names(out)
    assert sorted({n.split(".")[2] for n in names if n.startswith("model.blocks.")}) == ["0", "1", "2", "3"]
    assert len(names) == 4 * 9 + 3
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "shoal_layer_path"
    assert config["path"] == [[0, 0, 1.0], [1, 1, 0.75], [0, 1, 1.0], [1, 1, 1.25], [0, 2, 1.0]]
    assert config["layers"] == [[0, 0], [1, 1], [0, 1], [0, 2]]
    assert AutoTokenizer.from_pretrained(out)("cat dog")["input_ids"] == word_tokenizer("cat dog")["input_ids"]


def test_a_fresh_process_loads_the_folder_after_import_shoal(word_sources, word_tokenizer, tmp_path):
    """`import shoal` alone (no torch, no transformers yet) teaches AutoModelForCausalLM the
    architecture; no trust_remote_code."""
    a, b = word_sources
    out = write_path_model([a, b], make_path(PATH), tmp_path / "path_model")
    ids = word_tokenizer("what is two plus two ?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = build_path_model([a, b], make_path(PATH))(input_ids=ids).logits[0, -1]
    script = textwrap.dedent(f"""
        import sys
        import shoal
        assert "torch" not in sys.modules and "transformers" not in sys.modules
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}, dtype=torch.float32)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([{ids[0].tolist()}])).logits[0, -1]
        print(type(model).__name__, " ".join(repr(float(x)) for x in logits))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    name, *values = done.stdout.split("\n")[-2].split()
    assert name == "LayerPathForCausalLM"
    assert torch.allclose(torch.tensor([float(v) for v in values]), expected, atol=0, rtol=0)


def test_tied_embeddings_of_the_first_model(tiny_model_dir, tmp_path):
    """A source that ties its head to its embeddings (tiny Qwen2) keeps doing so."""
    from transformers import AutoModelForCausalLM

    q = tiny_model_dir("q", "qwen2", seed=3)
    q2 = tiny_model_dir("q2", "qwen2", seed=4, base=q)
    source = AutoModelForCausalLM.from_pretrained(q, dtype=torch.float32).eval()
    model = build_path_model([q, q2], identity_path(2))
    ids = torch.tensor([[5, 9, 17, 3, 40]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, source(input_ids=ids).logits)
    mixed = build_path_model([q, q2], make_path([(0, 0), (1, 1), (1, 0, 0.5), (0, 1)]))
    out = save_path_model(mixed, tmp_path / "tied")
    assert "lm_head.weight" not in stored_tensor_names(out)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, mixed(input_ids=ids).logits)


class CopyTask:
    """Answer = the greedy continuation the first source gives; scored by exact match."""

    name = "copy"
    kind = "generate"
    max_new_tokens = 4

    def __init__(self, examples):
        self._examples = examples

    def examples(self, split):
        return self._examples

    def score(self, output, example):
        return float(output.strip() == example.target)


def test_shoal_eval_scores_a_loaded_path_model(word_sources, tmp_path):
    """shoal.eval loads the folder through AutoModelForCausalLM and evaluates it in batches;
    the identity path of the first source scores exactly what the source does."""
    from shoal.eval.evaluate import evaluate
    from shoal.eval.generation import generate_greedy
    from shoal.eval.loading import load_model
    from shoal.eval.task import Example

    a, b = word_sources
    prompts = ["what is two plus two ?", "cat", "red blue", "one two three", "the dog is"]
    source, tokenizer = load_model(a)
    answers = generate_greedy(source, tokenizer, prompts, max_new_tokens=4)
    task = CopyTask([Example(p, t) for p, t in zip(prompts, answers)])
    same = write_path_model([a, b], identity_path(3), tmp_path / "same")
    other = write_path_model([a, b], make_path(PATH), tmp_path / "other")
    model, tokenizer = load_model(same)
    assert evaluate(model, tokenizer, task, "test", batch_size=2).score == 1.0
    model, tokenizer = load_model(other)
    assert evaluate(model, tokenizer, task, "test", batch_size=2).score < 1.0
