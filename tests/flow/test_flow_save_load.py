"""Saving a layer-path model as a Hugging Face folder and loading it with AutoModelForCausalLM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors import safe_open

import shoal

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


def run_fresh(parts: list[str], cwd, **env_updates) -> list[str]:
    """Run the script ``parts`` in a fresh interpreter; its last stdout line, split.

    PYTHONPATH is cleared unless given (the shoal under test lives on it). ``{threads}`` in a
    part becomes this process's torch thread count."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    parts = [part.replace("{threads}", str(torch.get_num_threads())) for part in parts]
    env.update({k: str(v) for k, v in env_updates.items()})
    script = "".join(textwrap.dedent(part) for part in parts)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().split("\n")[-1].split()


LOGITS = """
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads({{threads}})  # the test process's count: the same reduction order, the same bits
    model = AutoModelForCausalLM.from_pretrained({folder!r}, dtype=torch.float32{extra})
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([{ids}])).logits[0, -1]
    print(type(model).__module__, type(model).__name__, " ".join(repr(float(x)) for x in logits))
"""


def logits_of(words: list[str]) -> torch.Tensor:
    return torch.tensor([float(v) for v in words])


def test_the_folder_loads_with_remote_code_where_shoal_is_not_importable(word_sources, word_tokenizer,
                                                                         tmp_path):
    """config.json's auto_map and the two modeling files in the folder are all a process without
    shoal needs; the code in the folder computes what the in-library class computes."""
    a, b = word_sources
    model = build_path_model([a, b], make_path(PATH))
    out = save_path_model(model, tmp_path / "path_model")
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_layer_path.LayerPathConfig",
                                  "AutoModelForCausalLM": "modeling_layer_path.LayerPathForCausalLM"}
    for name in ("configuration_layer_path.py", "modeling_layer_path.py"):
        assert "shoal" not in "".join(l for l in (out / name).read_text().splitlines()
                                      if l.startswith(("import ", "from ")))
    ids = word_tokenizer("what is two plus two ?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids).logits[0, -1]
    script = """
        import sys
        from pathlib import Path
        sys.path[:] = [p for p in sys.path if not (Path(p or ".") / "shoal").is_dir()]
        try:
            import shoal
        except ModuleNotFoundError:
            pass
        else:
            raise SystemExit(f"shoal is importable from {shoal.__file__}")
    """
    load = LOGITS.format(folder=str(out), extra=", trust_remote_code=True", ids=ids[0].tolist())
    module, name, *values = run_fresh([script, load], tmp_path, HF_MODULES_CACHE=tmp_path / "modules")
    assert module.startswith("transformers_modules.") and name == "LayerPathForCausalLM"
    assert torch.equal(logits_of(values), expected)


def test_plain_from_pretrained_after_import_shoal(word_sources, word_tokenizer, tmp_path):
    """No remote code: `import shoal` registers the architecture when transformers' Auto classes
    are loaded, and shoal.flow.register() does where shoal came first; `import shoal` and
    `import shoal.flow` load no torch."""
    a, b = word_sources
    out = write_path_model([a, b], make_path(PATH), tmp_path / "path_model")
    ids = word_tokenizer("what is two plus two ?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = build_path_model([a, b], make_path(PATH))(input_ids=ids).logits[0, -1]
    load = LOGITS.format(folder=str(out), extra="", ids=ids[0].tolist())
    orders = {
        "Auto classes first": "from transformers import AutoModelForCausalLM\nimport shoal\n",
        "shoal first": "import sys\nimport shoal\nassert 'torch' not in sys.modules and 'transformers' not in "
                       "sys.modules\nimport transformers\nimport shoal.flow\nassert 'torch' not in sys.modules\n"
                       "shoal.flow.register()\n",
    }
    modules = tmp_path / "modules"
    tested = Path(shoal.__file__).parents[1]  # this shoal, not another install's
    for order, prefix in orders.items():
        module, name, *values = run_fresh([prefix, load], tmp_path, HF_MODULES_CACHE=modules, PYTHONPATH=tested)
        assert (module, name) == ("shoal.flow.modeling_layer_path", "LayerPathForCausalLM"), order
        assert torch.equal(logits_of(values), expected), order
    assert not modules.exists()  # transformers ran no code from the folder


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


def test_the_standalone_runtime_names_arguments_as_the_callee_declares():
    """What lets the folder's code run on transformers before and after 5.24 (checked by hand on
    4.57 and 5.23): the cache and the embeddings go under the name the callee declares."""
    from shoal.flow.modeling_layer_path import cache_keyword, embeds_keyword

    def layer_524(hidden, cache=None, **kwargs): ...
    def layer_523(hidden, past_key_values=None, **kwargs): ...
    def mask_4x(config, input_embeds, attention_mask, cache_position, past_key_values, position_ids=None): ...
    def mask_5x(config, inputs_embeds, attention_mask, past_key_values, position_ids=None): ...

    assert cache_keyword(layer_524) == "cache" and cache_keyword(layer_523) == "past_key_values"
    assert embeds_keyword(mask_4x) == "input_embeds" and embeds_keyword(mask_5x) == "inputs_embeds"
    assert cache_keyword(mask_4x) == cache_keyword(mask_5x) == "past_key_values"


def test_shoal_eval_cli_loads_a_path_folder_in_a_fresh_process(word_sources, tmp_path):
    """`shoal eval FOLDER` in a new process (shoal imported before transformers, no remote
    code): the loader registers the layer-path type the folder's config names."""
    import json
    import subprocess
    import sys

    a, b = word_sources
    out = write_path_model([a, b], identity_path(3), tmp_path / "same")
    task = tmp_path / "copy.jsonl"
    task.write_text("\n".join(json.dumps({"prompt": p, "target": "x"}) for p in ["cat", "red blue"]) + "\n")
    env = {**__import__("os").environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-m", "shoal.cli.main", "eval", str(out), "--task",
                             f"jsonl:{task}", "--json"], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["n"] == 2, result.stdout
    assert not (tmp_path / "modules").exists()  # no remote code ran
