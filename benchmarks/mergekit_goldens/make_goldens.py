"""Run mergekit on its own recipes (adapted to tiny local checkpoints) and store the goldens.

Reproduce (mergekit 0.1.5 in its own virtual environment; shoal is not imported)::

    OMP_NUM_THREADS=1 /work/venvs/mergekit/bin/python benchmarks/mergekit_goldens/make_goldens.py

Options: ``--only NAME [NAME ...]`` regenerates some recipes; ``--mergekit-bin DIR`` points at
another environment's ``bin`` folder (default: the folder of the running interpreter).

What it does:

1. builds every checkpoint of ``tests/goldens/tiny_checkpoints.py`` (fixed seeds) in a
   temporary folder and records their digests in ``tests/goldens/mergekit/checkpoints.json``;
2. for each ``recipes/*.yml``, replaces ``tiny/`` by that folder, runs ``mergekit-yaml`` (or
   ``mergekit-multi`` for ``# tool: multi``) with ``--random-seed 0`` plus the recipe's
   ``# mergekit-args:`` line, and stores in ``tests/goldens/mergekit/<recipe>.json``:
   the recipe text, the command, whether mergekit ran or refused (and the error line),
   per-tensor ``"dtype shape sha256"``, the shard count, a few config keys, the output vocabulary
   and chat template; the tensors themselves go to ``<recipe>.safetensors.xz``;
3. for random methods (``# random: base=...``), instead of tensors it stores statistics of the
   task vector ``out - base`` over the whole model: the share of non-zero entries and its norm
   (the tests compare shoal's to these).

Recipe header comments (all optional except ``source``)::

    # source: where the recipe comes from (mergekit file, doc section, issue item)
    # tool: multi                     run mergekit-multi instead of mergekit-yaml
    # random: base=tiny/<checkpoint>  compare by task-vector statistics against that base
    # mergekit-args: ...              extra flags for mergekit
    # shoal-args: ...                 flags for ``shoal merge`` (default: none)
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
GOLDENS = REPO / "tests" / "goldens" / "mergekit"
sys.path.insert(0, str(REPO / "tests" / "goldens"))

import tiny_checkpoints  # noqa: E402  (shared with the tests; needs only numpy/torch/transformers)

MAX_TENSOR_BYTES = 32 * 1024  # a recipe's tensors are stored (xz-compressed safetensors) up to this size


def tensor_entry(tensor) -> str:  # type: ignore[no-untyped-def]
    """``"dtype shape sha256"`` of one output tensor, e.g. ``"bfloat16 16x32 3f2a..."``."""
    dtype = str(tensor.dtype).replace("torch.", "")
    return f"{dtype} {'x'.join(map(str, tensor.shape))} {tiny_checkpoints.tensor_digest(tensor)}"


def parse_header(text: str) -> dict[str, str]:
    """The ``# key: value`` comment lines at the top of a recipe."""
    header: dict[str, str] = {}
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        key, _, value = line[1:].partition(":")
        header[key.strip()] = value.strip()
    return header


def error_line(stderr: str) -> str:
    """The last line that says what went wrong (an exception's message, or click's Error:)."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for line in reversed(lines):
        if line.startswith(("Error:", "RuntimeError", "ValueError", "KeyError", "TypeError",
                            "AssertionError", "NotImplementedError", "yaml.", "pydantic")) or "Error:" in line:
            return line[:400]
    return (lines[-1] if lines else "")[:400]


def read_output(folder: Path) -> tuple[dict, dict]:
    """The output's tensors (name -> tensor) and facts about its files."""
    from safetensors.torch import load_file

    tensors: dict = {}
    shards = sorted(folder.glob("*.safetensors"))
    for shard in shards:
        tensors.update(load_file(str(shard)))
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").exists() else {}
    facts: dict = {
        "shards": len(shards),
        "config": {k: config.get(k) for k in ("architectures", "num_hidden_layers", "vocab_size",
                                              "tie_word_embeddings", "dtype", "torch_dtype")},
    }
    tok_file = folder / "tokenizer.json"
    if tok_file.exists():
        tok = json.loads(tok_file.read_text())
        vocab = dict(tok["model"]["vocab"])
        for added in tok.get("added_tokens", []):
            vocab[added["content"]] = added["id"]
        facts["vocab"] = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    tok_cfg = folder / "tokenizer_config.json"
    template = None
    if tok_cfg.exists():
        template = json.loads(tok_cfg.read_text()).get("chat_template")
    if (folder / "chat_template.jinja").exists():
        template = (folder / "chat_template.jinja").read_text()
    facts["chat_template"] = template
    return tensors, facts


def task_vector_stats(tensors: dict, base: dict) -> dict:
    """Share of non-zero entries and norm of ``out - base`` over the tensors both share."""
    import torch

    nonzero = total = 0
    norm_sq = 0.0
    for name, tensor in tensors.items():
        if name not in base or base[name].shape != tensor.shape:
            continue
        delta = tensor.to(torch.float64) - base[name].to(torch.float64)
        nonzero += int(torch.count_nonzero(delta))
        total += delta.numel()
        norm_sq += float((delta * delta).sum())
    return {"nonzero_share": nonzero / total, "norm": norm_sq ** 0.5, "entries": total}


def run_recipe(path: Path, root: Path, work: Path, bin_dir: Path) -> dict:
    from safetensors.torch import load_file, save

    text = path.read_text()
    header = parse_header(text)
    name = path.stem
    (GOLDENS / f"{name}.safetensors.xz").unlink(missing_ok=True)
    concrete = text.replace("tiny/", f"{root}/")
    recipe_file = work / f"{name}.yml"
    recipe_file.write_text(concrete)
    out = work / f"{name}-out"
    extra = shlex.split(header.get("mergekit-args", ""))
    if header.get("tool") == "multi":
        cmd = [str(bin_dir / "mergekit-multi"), str(recipe_file), "--intermediate-dir", str(work / f"{name}-mid"),
               "--out-path", str(out)]
    else:
        cmd = [str(bin_dir / "mergekit-yaml"), str(recipe_file), str(out)]
    cmd += ["--random-seed", "0", "--quiet"] + extra
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=work)
    record: dict = {
        "name": name,
        "source": header.get("source", ""),
        "recipe": text,
        "tool": header.get("tool", "yaml"),
        "mergekit_command": ["mergekit-" + ("multi" if header.get("tool") == "multi" else "yaml"), "RECIPE", "OUT",
                             "--random-seed", "0", "--quiet"] + extra,
        "shoal_args": shlex.split(header.get("shoal-args", "")),
        "checkpoints": sorted({w.split("/")[1].split()[0] for w in text.split() if w.startswith("tiny/")}),
    }
    if proc.returncode != 0 or not out.exists():
        record["status"] = "refused"
        record["error"] = error_line(proc.stderr + proc.stdout).replace(f"{root}/", "tiny/")
        return record
    tensors, facts = read_output(out)
    record["status"] = "ok"
    record["files"] = facts
    record["tensors"] = {k: tensor_entry(v) for k, v in sorted(tensors.items())}
    if "random" in header:
        base_name = header["random"].split("=", 1)[1].strip().removeprefix("tiny/")
        base = load_file(str(root / base_name / "model.safetensors"))
        record["random"] = {"base": base_name, **task_vector_stats(tensors, base)}
    else:
        data = lzma.compress(save({k: v.contiguous() for k, v in tensors.items()}), preset=9)
        if len(data) <= MAX_TENSOR_BYTES:
            file = GOLDENS / f"{name}.safetensors.xz"
            file.write_bytes(data)
            record["tensor_file"] = file.name
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--mergekit-bin", type=Path, default=Path(sys.executable).parent)
    args = parser.parse_args()
    import importlib.metadata as md

    GOLDENS.mkdir(parents=True, exist_ok=True)
    recipes = sorted((HERE / "recipes").glob("*.yml"))
    if args.only:
        recipes = [r for r in recipes if r.stem in args.only]
    with tempfile.TemporaryDirectory(prefix="mk_goldens_") as tmp:
        root = Path(tmp) / "ckpt"
        digests = tiny_checkpoints.build_all(root)
        versions = {p: md.version(p) for p in ("mergekit", "torch", "transformers", "numpy")}
        (GOLDENS / "checkpoints.json").write_text(json.dumps({"versions": versions, "digests": digests},
                                                             indent=1) + "\n")
        for recipe in recipes:
            work = Path(tmp) / "work"
            work.mkdir(exist_ok=True)
            record = run_recipe(recipe, root, work, args.mergekit_bin)
            record["mergekit_version"] = versions["mergekit"]
            (GOLDENS / f"{recipe.stem}.json").write_text(json.dumps(record, indent=1) + "\n")
            print(f"{recipe.stem:45s} {record['status']:8s} {record.get('error', '')[:110]}", flush=True)


if __name__ == "__main__":
    main()
