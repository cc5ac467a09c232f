"""`shoal merge` attacked as in issue #18: every case one stderr line naming the problem, exit 2,
nothing at the destination and no staging folder left (or, for stale staging, one line saying so)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from shoal.cli.main import cli

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture(scope="module")
def pair(tiny_model_dir):  # type: ignore[no-untyped-def]
    base = tiny_model_dir("attack_base", "llama", seed=31)
    other = tiny_model_dir("attack_other", "llama", seed=32, base=base)
    return base, other


def linear(*models: Path) -> dict:
    return {"merge_method": "linear", "models": [{"model": str(m)} for m in models]}


def invoke(tmp_path: Path, recipe: dict | str | bytes, *extra: str, out: Path | None = None):  # type: ignore[no-untyped-def]
    path = tmp_path / "recipe.yaml"
    if isinstance(recipe, bytes):
        path.write_bytes(recipe)
    else:
        path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe))
    out = tmp_path / "out" if out is None else out
    return CliRunner().invoke(cli, ["merge", str(path), str(out), "-q", *extra]), out


def one_line_exit_2(result, out: Path, *fragments: str, folder: Path | None = None) -> str:  # type: ignore[no-untyped-def]
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not out.exists()
    folder = out.parent if folder is None else folder
    assert not [p.name for p in folder.iterdir() if ".staging-" in p.name or ".old-" in p.name]
    return lines[0]


def fails(tmp_path: Path, recipe: dict | str | bytes, *fragments: str, extra: tuple[str, ...] = ()) -> str:
    result, out = invoke(tmp_path, recipe, *extra)
    return one_line_exit_2(result, out, *fragments)


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def header_of(file: Path) -> tuple[dict, bytes]:
    data = file.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]), data[8 + length:]


def write_with_header(file: Path, header: dict | bytes, body: bytes) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


# -- recipes that used to give tracebacks -----------------------------------------------------

@pytest.mark.parametrize("raw", [b"\x00\xff\xfe\x89PNG\x01\x02\x03", "merge_method: linear # caf\xe9\n".encode("latin-1")])
def test_recipe_not_utf8(tmp_path: Path, raw: bytes) -> None:
    fails(tmp_path, raw, "recipe.yaml", "not a UTF-8 text file")


def test_recipe_nested_50k_deep(tmp_path: Path) -> None:
    fails(tmp_path, "a: " + "[" * 50_000 + "]" * 50_000 + "\n", "recipe.yaml", "nested more than")


def test_recipe_alias_bomb(tmp_path: Path) -> None:
    """A "billion laughs" file: nine levels of nine aliases stand for 9^9 values; refused while read."""
    lines = ['merge_method: linear', 'l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
    fails(tmp_path, "\n".join(lines) + "\nmodels: []\n", "recipe.yaml", "aliases stand for more than")


def test_recipe_alias_inside_its_own_anchor(tmp_path: Path) -> None:
    fails(tmp_path, "merge_method: linear\nparameters: &p {weight: [1, *p]}\nmodels: []\n", "recipe.yaml",
          "*p at line 2 is inside its own anchor")


def test_recipe_reusing_a_block_by_alias_still_loads(tmp_path: Path, pair) -> None:  # type: ignore[no-untyped-def]
    base, other = pair
    text = (f"merge_method: linear\nmodels:\n  - model: {base}\n    parameters: &w {{weight: 0.5}}\n"
            f"  - model: {other}\n    parameters: *w\n")
    result, out = invoke(tmp_path, text)
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file()


def test_empty_gradient_list(tmp_path: Path, pair) -> None:  # type: ignore[no-untyped-def]
    recipe = linear(*pair)
    recipe["models"][0]["parameters"] = {"weight": []}
    fails(tmp_path, recipe, "models.0.parameters.weight", "empty list")


def test_device_that_does_not_exist(tmp_path: Path, pair) -> None:  # type: ignore[no-untyped-def]
    fails(tmp_path, linear(*pair), "--device tpu", "cpu, cuda", extra=("--device", "tpu"))


def test_out_under_a_regular_file(tmp_path: Path, pair) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "afile").write_text("x")
    result, out = invoke(tmp_path, linear(*pair), out=tmp_path / "afile" / "out")
    line = one_line_exit_2(result, out, "afile is a file", folder=tmp_path)
    assert (tmp_path / "afile").read_text() == "x", line


def test_safetensors_header_nested_200k_deep(tmp_path: Path, pair) -> None:  # type: ignore[no-untyped-def]
    broken = copy_model(pair[1], tmp_path / "src_deep")
    write_with_header(broken / "model.safetensors", b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}", b"")
    fails(tmp_path, linear(pair[0], broken), "model.safetensors", "nested too deeply")


# -- several lines that are now one -----------------------------------------------------------

def test_recipe_is_a_folder_and_out_is_a_file(tmp_path: Path, pair) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "afolder"
    folder.mkdir()
    result = CliRunner().invoke(cli, ["merge", str(folder), str(tmp_path / "out"), "-q"])
    one_line_exit_2(result, tmp_path / "out", "afolder", "Is a directory")
    (tmp_path / "afile").write_text("x")
    result, _ = invoke(tmp_path, linear(*pair), out=tmp_path / "afile")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "afile: output path exists and is not a folder" in result.stderr
    # a usage error stays one (exit 64)
    result, _ = invoke(tmp_path, linear(*pair), "--no-such-option")
    assert result.exit_code == 64


def test_malicious_pickle_with_allow_pickle(tmp_path: Path, pair) -> None:  # type: ignore[no-untyped-def]
    import pickle

    evil = tmp_path / "src_evil"
    evil.mkdir()
    shutil.copy(pair[1] / "config.json", evil / "config.json")

    class Payload:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, ("touch PWNED",))

    with (evil / "pytorch_model.bin").open("wb") as handle:  # plain pickle, protocol 4: torch warns about it
        pickle.dump({"x": Payload()}, handle, protocol=4)
    import warnings

    with warnings.catch_warnings(record=True) as caught:  # a warning would be more lines on stderr
        warnings.simplefilter("always")
        fails(tmp_path, linear(pair[0], evil), "pytorch_model.bin", "refused by torch.load(weights_only=True)",
              "Unsupported operand", extra=("--allow-pickle",))
    assert not [str(w.message) for w in caught]
    assert not Path("PWNED").exists()


def test_misspelt_key_in_a_filter_entry(tmp_path: Path, pair) -> None:  # type: ignore[no-untyped-def]
    recipe = linear(*pair)
    recipe["models"][0]["parameters"] = {"weight": [{"filtr": "mlp", "value": 0.5}, {"value": 1.0}]}
    line = fails(tmp_path, recipe, "unknown key 'filtr'", "models.0.parameters.weight")
    assert "bool" not in line


# -- bad input that used to be accepted -------------------------------------------------------

def test_float_relabelled_as_int(tmp_path: Path, pair) -> None:  # type: ignore[no-untyped-def]
    broken = copy_model(pair[1], tmp_path / "src_relabel")
    header, body = header_of(broken / "model.safetensors")
    header["model.layers.0.mlp.up_proj.weight"]["dtype"] = "I32"  # same byte length
    write_with_header(broken / "model.safetensors", header, body)
    fails(tmp_path, linear(pair[0], broken), "model.layers.0.mlp.up_proj.weight", "int32", "not floating point")


def test_duplicate_yaml_key(tmp_path: Path, pair) -> None:  # type: ignore[no-untyped-def]
    base, other = pair
    text = f"merge_method: linear\nmodels:\n  - model: {base}\n  - model: {other}\nmodels:\n  - model: {base}\n"
    fails(tmp_path, text, "key 'models' appears twice", "lines 2 and 5")


def test_models_with_different_layer_counts(tmp_path: Path, pair, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    deeper = tiny_model_dir("attack_deeper", "llama", seed=33, num_layers=3)
    fails(tmp_path, linear(pair[0], deeper), "has 2 layers", "has 3", "slices")
    # slices say which layers: merged
    slices = {"merge_method": "linear", "slices": [{"sources": [
        {"model": str(pair[0]), "layer_range": [0, 2]}, {"model": str(deeper), "layer_range": [1, 3]}]}]}
    result, out = invoke(tmp_path, slices)
    assert result.exit_code == 0, result.output
    assert (out / "config.json").exists()


def test_bool_where_a_number_is_expected(tmp_path: Path, pair) -> None:  # type: ignore[no-untyped-def]
    base, other = pair
    recipe = {"merge_method": "ties", "base_model": str(base),
              "models": [{"model": str(other), "parameters": {"density": True, "weight": 1.0}}]}
    fails(tmp_path, recipe, "density", "is a number, got true/false")


# -- disk full --------------------------------------------------------------------------------

def test_disk_full_while_writing(tmp_path: Path, pair, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    real = os.pwrite

    def full(fd: int, data, offset: int) -> int:  # type: ignore[no-untyped-def]
        if offset > 4096:  # the first tensor bytes after the header
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full)
    line = fails(tmp_path, linear(*pair), str(tmp_path / "out"), "no space left", "needs at least", "free there")
    assert "KiB" in line


def test_disk_full_before_writing(tmp_path: Path, pair, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import shoal.checkpoint.staging as staging

    monkeypatch.setattr(staging, "_free_bytes", lambda folder: 1000)
    fails(tmp_path, linear(*pair), "no space left", "1000 B free there")


def test_disk_full_on_a_small_tmpfs(tmp_path: Path, pair) -> None:  # type: ignore[no-untyped-def]
    disk = tmp_path / "disk"
    disk.mkdir()
    size = 104 * 1024  # the tensors (about 97 KiB) fit, the whole folder does not: full half way
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        result, out = invoke(disk, linear(*pair))
        one_line_exit_2(result, out, "no space left", "free there")
        assert sorted(p.name for p in disk.iterdir()) == ["recipe.yaml"]
    finally:
        subprocess.run(["umount", str(disk)], check=False)


# -- sources that change during the merge -----------------------------------------------------

def _after_first_read(monkeypatch, action) -> None:  # type: ignore[no-untyped-def]
    import shoal.merge.chunks as chunks

    real = chunks.Sources.read
    state = {"done": False}

    def read(self, ref, start, stop, *, check=True):  # type: ignore[no-untyped-def]
        if not state["done"]:
            state["done"] = True
            action()
        return real(self, ref, start, stop, check=check)

    monkeypatch.setattr(chunks.Sources, "read", read)


def test_source_replaced_by_rename_during_the_merge(tmp_path: Path, pair, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    moving = copy_model(pair[1], tmp_path / "src_moving")
    replacement = tmp_path / "src_replacement.safetensors"
    shutil.copy(pair[0] / "model.safetensors", replacement)
    _after_first_read(monkeypatch, lambda: os.replace(replacement, moving / "model.safetensors"))
    fails(tmp_path, linear(pair[0], moving), str(moving / "model.safetensors"), "replaced by another file")


def test_source_rewritten_in_place_without_a_lease(tmp_path: Path, pair, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import shoal.checkpoint.reader as reader

    monkeypatch.setattr(reader, "take_read_lease", lambda fd: False)  # e.g. a file of another user
    changing = copy_model(pair[1], tmp_path / "src_changing")
    file = changing / "model.safetensors"

    def rewrite() -> None:
        data = bytearray(file.read_bytes())
        data[-8:] = bytes(8)
        with file.open("r+b") as handle:
            handle.write(data)
        stat = file.stat()
        os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))

    _after_first_read(monkeypatch, rewrite)
    fails(tmp_path, linear(pair[0], changing), str(file), "rewritten")


def test_source_truncated_without_a_lease(tmp_path: Path, pair, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import shoal.checkpoint.reader as reader

    monkeypatch.setattr(reader, "take_read_lease", lambda fd: False)
    shrinking = copy_model(pair[1], tmp_path / "src_shrinking")
    file = shrinking / "model.safetensors"
    _after_first_read(monkeypatch, lambda: os.truncate(file, 4096))
    fails(tmp_path, linear(pair[0], shrinking), str(file), "resized")


TRUNCATE_DURING_MERGE = textwrap.dedent("""
    import fcntl, subprocess, sys, time
    import shoal.merge.chunks as chunks
    from shoal.cli.main import main

    victim, recipe, out = sys.argv[1:4]
    real = chunks.Sources.read
    state = {}

    def read(self, ref, start, stop, *, check=True):
        reader = self.readers[ref.model]
        if "writer" not in state and str(reader.shard_path(ref.tensor)) == victim:
            real(self, ref, start, stop, check=check)  # mapped: the reader holds its lease now
            state["writer"] = subprocess.Popen([sys.executable, "-c", f"import os; os.truncate({victim!r}, 64)"])
            fd = reader._fds[reader.shard_path(ref.tensor)]
            while fcntl.fcntl(fd, fcntl.F_GETLEASE) == fcntl.F_RDLCK and state["writer"].poll() is None:
                time.sleep(0.01)  # the truncation waits on the lease (or, without one, is done)
            if state["writer"].poll() is not None:
                time.sleep(0.05)
        return real(self, ref, start, stop, check=check)

    chunks.Sources.read = read
    main(["merge", recipe, out, "-q"])
""")


def test_source_truncated_during_a_mapped_merge(tmp_path: Path, pair) -> None:  # type: ignore[no-untyped-def]
    """Truncating a memory-mapped source used to kill the merge with SIGBUS and leave its staging."""
    victim = copy_model(pair[1], tmp_path / "src_victim")
    file = victim / "model.safetensors"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(linear(pair[0], victim)))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", TRUNCATE_DURING_MERGE, str(file), str(recipe), str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(file) in lines[0], done.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".staging-" in p.name]


# -- leftovers of killed merges ---------------------------------------------------------------

def test_stale_staging_of_a_killed_merge_is_removed(tmp_path: Path, pair) -> None:  # type: ignore[no-untyped-def]
    import socket

    from shoal.checkpoint.staging import _host

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = tmp_path / f".out.staging-{gone.pid}@{_host()}-abcd1234"
    stale.mkdir()
    (stale / "model-shard.safetensors.partial").write_bytes(b"x" * 1000)
    live = tmp_path / f".out.staging-{os.getpid()}@{_host()}-efgh5678"  # a merge still running
    live.mkdir()
    assert socket.gethostname()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(linear(*pair)))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "shoal.cli.main", "merge", str(recipe), str(out), "-q"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]  # the warning, as a user sees it
    assert len(lines) == 1 and "removed 1 staging folder" in lines[0] and stale.name in lines[0], done.stderr
    assert not stale.exists() and live.exists()
    assert load_file(out / "model.safetensors")["model.norm.weight"].dtype == torch.float32


def test_staging_names_the_merging_process(tmp_path: Path, pair, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import shoal.merge.execute as execute

    seen = []
    real = execute.execute_plan

    def spy(plan, readers, out_dir, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(out_dir.name)
        return real(plan, readers, out_dir, **kwargs)

    monkeypatch.setattr(execute, "execute_plan", spy)
    result, _ = invoke(tmp_path, linear(*pair))
    assert result.exit_code == 0, result.output
    assert seen and seen[0].startswith(f".out.staging-{os.getpid()}@")
