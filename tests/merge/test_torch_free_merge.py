"""``shoal merge`` on the fused CPU path runs without importing torch, and writes what the torch code writes.

Each CLI run here is a fresh process (``python -m shoal.cli.main``) that reports, when it exits,
which heavy modules it imported. The outputs are compared byte for byte with the reference
backend's (every op whole, in torch). Paths that need torch (pickle inputs, a method without
a fused loop, mergekit's sequential draws) still work in such a process and import it then.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from shoal.merge import merge
from shoal.merge.execute import ExecutorOptions

HAVE_NUMBA = importlib.util.find_spec("numba") is not None
needs_numba = pytest.mark.skipif(not HAVE_NUMBA, reason="numba (the 'fast' extra) is not installed")
SRC = Path(__file__).resolve().parents[2] / "src"

# a wide matrix (several fused chunks and the sampled TIES bracket), a small one, a vector
SHAPES = {"model.embed_tokens.weight": (1100, 256), "model.layers.0.mlp.up_proj.weight": (64, 48),
          "model.norm.weight": (256,)}
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 1,
          "hidden_size": 256, "vocab_size": 1100}

_RUNNER = """
import atexit, json, sys
report = sys.argv[1]
atexit.register(lambda: open(report, "w").write(json.dumps(
    sorted(name for name in ("torch", "transformers", "safetensors") if name in sys.modules))))
from shoal.cli.main import main
main(sys.argv[2:])
"""


def _write(folder: Path, tensors: dict[str, torch.Tensor], *, pickle: bool = False) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(CONFIG))
    if pickle:
        torch.save(tensors, folder / "pytorch_model.bin")
    else:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def trio(tmp_path_factory) -> list[Path]:  # type: ignore[no-untyped-def]
    """A bf16 base and two fine-tunes (with exact ties of |task vector| and -0.0)."""
    root = tmp_path_factory.mktemp("trio")
    gen = torch.Generator().manual_seed(3)
    base = {name: torch.randn(shape, generator=gen) * 0.02 for name, shape in SHAPES.items()}
    folders = [_write(root / "base", {k: v.to(torch.bfloat16) for k, v in base.items()})]
    for i, name in enumerate("ab"):
        tuned = {}
        for key, value in base.items():
            flat = (value + torch.round(torch.randn(value.shape, generator=gen) * 8) * 2.0**-12).reshape(-1)
            flat[i * 50:i * 50 + 100] = value.reshape(-1)[i * 50:i * 50 + 100]
            flat[-5:] = -0.0
            tuned[key] = flat.reshape(value.shape).to(torch.bfloat16)
        folders.append(_write(root / name, tuned))
    return folders


def _recipe(method: str, base: Path, a: Path, b: Path, **extra: object) -> dict:
    return {"merge_method": method, "base_model": str(base), **extra,
            "models": [{"model": str(a), "parameters": {"density": 0.4, "weight": 0.3}},
                       {"model": str(b), "parameters": {"density": 0.7, "weight": 0.7}}]}


def _shoal(tmp_path: Path, *args: str, cache: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    """``shoal ARGS`` in a fresh process: its result and the heavy modules it imported."""
    report = tmp_path / f"imported-{len(list(tmp_path.glob('imported-*')))}.json"
    env = {**os.environ, "PYTHONPATH": str(SRC), "SHOAL_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _RUNNER, str(report), *args], env=env, capture_output=True,
                          text=True, timeout=600)
    return done, json.loads(report.read_text()) if report.is_file() else []


def _same_files(first: Path, second: Path) -> None:
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


@needs_numba
@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_fused_cli_merge_imports_no_torch_and_writes_the_reference(tmp_path: Path, trio, method: str) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(method, *trio, seed=5)))
    merge(recipe, tmp_path / "reference", options=ExecutorOptions(backend="reference"))
    cache = tmp_path / "cache"
    # a cold cache: torch is asked once how it rounds, and the answer kept
    done, imported = _shoal(tmp_path, "merge", str(recipe), str(tmp_path / "cold"), "--quiet", cache=cache)
    assert done.returncode == 0, done.stderr
    assert "torch" in imported
    assert list(json.loads((cache / "torch-rounding.json").read_text()).values()) in ([True], [False])
    # then no torch, nor anything else heavy the path does not need
    done, imported = _shoal(tmp_path, "merge", str(recipe), str(tmp_path / "warm"), "--quiet", cache=cache)
    assert done.returncode == 0, done.stderr
    assert imported == []
    _same_files(tmp_path / "reference", tmp_path / "warm")
    _same_files(tmp_path / "reference", tmp_path / "cold")


@needs_numba
@pytest.mark.parametrize("recipe_extra,expect_torch", [
    ({"merge_method": "dare_linear"}, True),  # no fused loop: torch chunks
    ({"compat": "mergekit"}, True),  # mergekit's sequential draws: whole tensors
    ({"dtype": "float16"}, False),  # bf16 sources widened, rounded once to float16 (numpy's rounding)
], ids=["no_fused_loop", "mergekit_draws", "dtype_float16"])
def test_other_paths_in_a_torch_free_process(tmp_path: Path, trio, recipe_extra: dict, expect_torch: bool) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**_recipe("dare_ties", *trio, seed=2), **recipe_extra}))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the shoal processes below run (OMP_NUM_THREADS=1): with `compat:
    try:  # mergekit` the whole-tensor DARE draws came out other bits at 2 torch threads (not yet traced)
        merge(recipe, tmp_path / "reference", options=ExecutorOptions(backend="reference"))
    finally:
        torch.set_num_threads(threads)
    cache = tmp_path / "cache"
    _shoal(tmp_path, "merge", str(recipe), str(tmp_path / "first"), "--quiet", cache=cache)  # fills the cache
    done, imported = _shoal(tmp_path, "merge", str(recipe), str(tmp_path / "out"), "--quiet", cache=cache)
    assert done.returncode == 0, done.stderr
    assert ("torch" in imported) == expect_torch, imported
    _same_files(tmp_path / "reference", tmp_path / "out")


@needs_numba
def test_pickle_sources_import_torch_and_merge_the_same(tmp_path: Path, trio) -> None:
    from safetensors.torch import load_file

    pickled = [_write(tmp_path / f"pickled_{folder.name}", load_file(str(folder / "model.safetensors")), pickle=True)
               for folder in trio]
    cache = tmp_path / "cache"
    outputs = {}
    for kind, folders in (("safetensors", trio), ("pickle", pickled)):
        recipe = tmp_path / f"{kind}.yaml"
        recipe.write_text(yaml.safe_dump(_recipe("dare_ties", *folders, seed=4)))
        done, imported = _shoal(tmp_path, "merge", str(recipe), str(tmp_path / kind), "--quiet", "--allow-pickle",
                                cache=cache)
        assert done.returncode == 0, done.stderr
        outputs[kind] = (tmp_path / kind / "model.safetensors").read_bytes()
    assert "torch" in imported  # the pickle run
    assert outputs["pickle"] == outputs["safetensors"]


def test_bad_input_is_one_line_and_exit_2_without_torch(tmp_path: Path, trio) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps(CONFIG))
    (broken / "model.safetensors").write_bytes((64).to_bytes(8, "little") + b"{" * 64)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(_recipe("dare_ties", trio[0], trio[1], broken)))
    done, imported = _shoal(tmp_path, "merge", str(recipe), str(tmp_path / "out"), cache=tmp_path / "cache")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "model.safetensors" in lines[0], done.stderr
    assert "torch" not in imported
    assert not (tmp_path / "out").exists()


@needs_numba
@pytest.mark.parametrize("sources,written", [("float16", "bfloat16"), ("float32", "bfloat16"),
                                             ("float32", "float16"), ("bfloat16", "float32")])
def test_fused_loops_round_to_a_recipe_dtype_as_torch_does(tmp_path: Path, trio, sources: str,
                                                           written: str) -> None:
    from safetensors.torch import load_file

    folders = [_write(tmp_path / folder.name, {k: v.to(getattr(torch, sources))
                                               for k, v in load_file(str(folder / "model.safetensors")).items()})
               for folder in trio]
    recipe = tmp_path / "recipe.yaml"
    for method in ("ties", "dare_ties"):
        recipe.write_text(yaml.safe_dump(_recipe(method, *folders, seed=9, dtype=written)))
        merge(recipe, tmp_path / f"{method}-reference", options=ExecutorOptions(backend="reference"))
        merge(recipe, tmp_path / f"{method}-fused", options=ExecutorOptions(fused_chunks=2))
        _same_files(tmp_path / f"{method}-reference", tmp_path / f"{method}-fused")


@needs_numba
def test_numpy_conversions_are_torchs() -> None:
    from shoal.checkpoint.dtypes import as_float32
    from shoal.checkpoint.finite import array_all_finite
    from shoal.merge.fast import fused

    rng = np.random.default_rng(1)
    bits32 = np.concatenate([rng.integers(0, 2**32, 1 << 18, dtype=np.uint32),
                             np.array([0, 0x80000000, 0x7F800000, 0x477FE000, 0x477FF000, 0x33800000, 0x33000001,
                                       0x387FC000], dtype=np.uint32)])
    values = bits32.view(np.float32)
    values = values[np.isfinite(values)]
    tensor = torch.from_numpy(values.copy())
    for to in ("float16", "bfloat16"):
        expected = tensor.to(getattr(torch, to)).view(torch.int16).numpy().view(np.uint16)
        got = fused.convert(values, "float32", to)
        assert np.array_equal(got.view(np.uint16), expected), to
    for stored in ("float16", "bfloat16"):
        bits = rng.integers(0, 2**16, 1 << 16, dtype=np.uint16)
        as_tensor = torch.from_numpy(bits.view(np.int16).copy()).view(getattr(torch, stored))
        wide = as_float32(bits if stored == "bfloat16" else bits.view(np.float16), stored)
        number = ~np.isnan(wide)  # NaN payloads may differ; a NaN is refused before anything is written
        assert np.array_equal(np.isnan(as_tensor.float().numpy()), ~number)
        assert np.array_equal(wide[number].view(np.uint32), as_tensor.float().numpy()[number].view(np.uint32))
        finite = as_tensor[torch.isfinite(as_tensor)]
        assert array_all_finite(finite.view(torch.int16).numpy().view(np.uint16), stored)
        assert not array_all_finite(bits, stored)  # random bits hold NaNs and Infs


def test_default_worker_count_without_torch(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from shoal import runtime

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert runtime._default_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert 1 <= runtime._default_threads() <= (os.cpu_count() or 1)


@pytest.mark.parametrize("scale,expect_torch", [(1.0, False), (0.5, True)])
def test_passthrough_unscaled_is_copied_without_torch(tmp_path: Path, trio, scale: float,
                                                       expect_torch: bool) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "passthrough", "dtype": "bfloat16",
                                      "models": [{"model": str(trio[1]), "parameters": {"scale": scale}}]}))
    merge(recipe, tmp_path / "reference", options=ExecutorOptions(backend="reference"))
    done, imported = _shoal(tmp_path, "merge", str(recipe), str(tmp_path / "out"), "--quiet", cache=tmp_path / "cache")
    assert done.returncode == 0, done.stderr
    assert ("torch" in imported) == expect_torch, imported
    _same_files(tmp_path / "reference", tmp_path / "out")
