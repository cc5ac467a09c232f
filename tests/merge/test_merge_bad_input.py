"""Every bad input gets one line on stderr naming the problem, exit code 2, and no output."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from shoal.cli.main import cli


@pytest.fixture(scope="module")
def pair(tiny_model_dir):  # type: ignore[no-untyped-def]
    base = tiny_model_dir("bad_base", "llama", seed=21)
    other = tiny_model_dir("bad_other", "llama", seed=22, base=base)
    return base, other


def merge_fails(tmp_path: Path, recipe: dict | str, *fragments: str, extra: list[str] | None = None) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe))
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["merge", str(path), str(out), "-q", *(extra or [])])
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in {"recipe.yaml"} and not p.name.startswith("src")]
    assert leftovers == [], leftovers
    return lines[0]


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def linear(*models: Path) -> dict:
    return {"merge_method": "linear", "models": [{"model": str(m)} for m in models]}


def test_unknown_key(tmp_path: Path, pair) -> None:  # type: ignore[no-untyped-def]
    recipe = linear(*pair) | {"bogus_key": 1}
    merge_fails(tmp_path, recipe, "unknown key 'bogus_key'")


def test_unknown_method(tmp_path: Path, pair) -> None:  # type: ignore[no-untyped-def]
    recipe = linear(*pair) | {"merge_method": "frankenmix"}
    merge_fails(tmp_path, recipe, "unknown merge method 'frankenmix'", "ties")


def test_unknown_parameter(tmp_path: Path, pair) -> None:  # type: ignore[no-untyped-def]
    recipe = linear(*pair)
    recipe["models"][0]["parameters"] = {"densty": 0.5}
    merge_fails(tmp_path, recipe, "unknown parameter 'densty'")


def test_density_out_of_range(tmp_path: Path, pair) -> None:  # type: ignore[no-untyped-def]
    base, other = pair
    recipe = {"merge_method": "ties", "base_model": str(base),
              "models": [{"model": str(other), "parameters": {"density": 1.5}}]}
    merge_fails(tmp_path, recipe, "density", "[0, 1]")


def test_yaml_python_tag(tmp_path: Path, pair) -> None:  # type: ignore[no-untyped-def]
    text = "merge_method: !!python/object/apply:os.system ['true']\nmodels: []\n"
    merge_fails(tmp_path, text, "refused YAML tag")


def test_missing_model_folder(tmp_path: Path, pair) -> None:  # type: ignore[no-untyped-def]
    merge_fails(tmp_path, linear(pair[0], tmp_path / "src_missing"), "src_missing")


def test_truncated_safetensors(tmp_path: Path, pair) -> None:  # type: ignore[no-untyped-def]
    broken = copy_model(pair[1], tmp_path / "src_trunc")
    file = broken / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    merge_fails(tmp_path, linear(pair[0], broken), "model.safetensors")


def test_header_that_lies_about_offsets(tmp_path: Path, pair) -> None:  # type: ignore[no-untyped-def]
    broken = copy_model(pair[1], tmp_path / "src_lies")
    file = broken / "model.safetensors"
    data = bytearray(file.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    header = yaml.safe_load(bytes(data[8:8 + length]).decode())  # JSON is YAML
    name = next(k for k in header if k != "__metadata__")
    start, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [start, end + 4096]
    import json

    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(data[8 + length:]))
    merge_fails(tmp_path, linear(pair[0], broken), "model.safetensors")


def test_missing_tensor(tmp_path: Path, pair) -> None:  # type: ignore[no-untyped-def]
    broken = copy_model(pair[1], tmp_path / "src_missing_tensor")
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    merge_fails(tmp_path, linear(pair[0], broken), "model.layers.1.mlp.up_proj.weight", "missing")


def test_shape_mismatch(tmp_path: Path, pair) -> None:  # type: ignore[no-untyped-def]
    broken = copy_model(pair[1], tmp_path / "src_shape")
    tensors = load_file(broken / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(65, 32)
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    merge_fails(tmp_path, linear(pair[0], broken), "shape mismatch", "model.layers.0.mlp.up_proj.weight")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_a_source(tmp_path: Path, pair, bad: float) -> None:  # type: ignore[no-untyped-def]
    broken = copy_model(pair[1], tmp_path / "src_nan")
    tensors = load_file(broken / "model.safetensors")
    tensors["model.layers.1.self_attn.o_proj.weight"][3, 4] = bad
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    merge_fails(tmp_path, linear(pair[0], broken), "model.layers.1.self_attn.o_proj.weight")


def test_pickle_without_allow_pickle(tmp_path: Path, pair) -> None:  # type: ignore[no-untyped-def]
    pickled = tmp_path / "src_pickle"
    shutil.copytree(pair[1], pickled)
    tensors = load_file(pickled / "model.safetensors")
    (pickled / "model.safetensors").unlink()
    torch.save(tensors, pickled / "pytorch_model.bin")
    merge_fails(tmp_path, linear(pair[0], pickled), "--allow-pickle")
    # with the flag it merges
    recipe = tmp_path / "recipe.yaml"
    out = tmp_path / "ok"
    result = CliRunner().invoke(cli, ["merge", str(recipe), str(out), "-q", "--allow-pickle"])
    assert result.exit_code == 0, result.output
    assert (out / "config.json").exists()


def test_index_pointing_outside_its_folder(tmp_path: Path, pair) -> None:  # type: ignore[no-untyped-def]
    import json

    sharded = copy_model(pair[1], tmp_path / "src_escape")
    tensors = load_file(sharded / "model.safetensors")
    (sharded / "model.safetensors").unlink()
    save_file(tensors, str(tmp_path / "src_outside.safetensors"), metadata={"format": "pt"})
    index = {"metadata": {"total_size": 0},
             "weight_map": {k: "../src_outside.safetensors" for k in tensors}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    merge_fails(tmp_path, linear(pair[0], sharded), "model.safetensors.index.json")


def test_existing_destination_is_kept(tmp_path: Path, pair) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(linear(*pair)))
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = CliRunner().invoke(cli, ["merge", str(path), str(out), "-q"])
    assert result.exit_code == 2
    assert (out / "keep.txt").read_text() == "precious"


def test_failure_mid_merge_leaves_nothing(tmp_path: Path, pair, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A merge that dies half way (here: an exception after some tensors were written)
    leaves no output and no staging folder behind."""
    import shoal.merge.execute as execute

    calls = {"n": 0}

    def dying(real):  # type: ignore[no-untyped-def]
        def run(*args, **kwargs):  # type: ignore[no-untyped-def]
            calls["n"] += 1
            if calls["n"] == 5:
                raise KeyboardInterrupt
            return real(*args, **kwargs)
        return run

    # the whole-tensor and the streamed (chunked) executor
    monkeypatch.setattr(execute, "compute_op", dying(execute.compute_op))
    monkeypatch.setattr(execute, "start_stages", dying(execute.start_stages))
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(linear(*pair)))
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["merge", str(path), str(out), "-q"])
    assert result.exit_code != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


@pytest.mark.parametrize("device", ["tpu", "x:y:z", "meta", "mps"])
def test_api_refuses_a_device_it_does_not_merge_on(tmp_path: Path, pair, device: str) -> None:  # type: ignore[no-untyped-def]
    """The Python API names its argument, as the CLI names --device; nothing is written."""
    from shoal.errors import MergeError
    from shoal.merge import merge
    from shoal.merge.extract_lora import extract_lora

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(linear(*pair)))
    with pytest.raises(MergeError, match=rf"device '{device}': shoal merges on 'cpu', 'cuda' or 'cuda:N'"):
        merge(path, tmp_path / "out", device=device)
    with pytest.raises(MergeError, match="shoal merges on"):
        extract_lora(pair[1], pair[0], tmp_path / "lora", rank=2, device=device)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]
