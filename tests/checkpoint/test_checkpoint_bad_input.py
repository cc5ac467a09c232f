"""Every malformed input is a CheckpointError whose message names the file (and tensor/entry)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from shoal.checkpoint import open_checkpoint, read_header
from shoal.errors import CheckpointError


def fails(source, *fragments: str, **kwargs) -> CheckpointError:
    with pytest.raises(CheckpointError) as info:
        reader = open_checkpoint(source, **kwargs)
        for name in reader.tensor_names():
            reader.get(name)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return info.value


def test_valid_hand_made_file_reads(two_tensor_file):
    path = two_tensor_file()
    reader = open_checkpoint(path)
    assert reader.tensor_names() == ["a", "b"]
    assert torch.equal(reader.get("a"), torch.arange(6, dtype=torch.float32).reshape(2, 3))
    assert read_header(path).metadata == {"format": "pt"}


def test_truncated_file(two_tensor_file, tmp_path):
    path = two_tensor_file()
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-5])
    fails(cut, str(cut), "'b'", "truncated")
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(data[:5])
    fails(tiny, str(tiny), "truncated")
    no_header = tmp_path / "noheader.safetensors"
    no_header.write_bytes(data[:40])
    fails(no_header, str(no_header), "header")


def test_garbage_header(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes((20).to_bytes(8, "little") + b"\xff\xfenot json at all!!" + b"\x00" * 16)
    fails(path, str(path), "not valid UTF-8 JSON")
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes((2**62).to_bytes(8, "little") + b"{}")
    fails(huge, str(huge), "header")
    listing = tmp_path / "list.safetensors"
    listing.write_bytes((2).to_bytes(8, "little") + b"[]")
    fails(listing, str(listing), "not a JSON object")


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        ({"b": {"data_offsets": [20, 36]}}, ["'b'", "overlaps"]),
        ({"b": {"data_offsets": [28, 44]}}, ["'b'", "gap"]),
        ({"b": {"data_offsets": [24, 56], "shape": [8]}}, ["'b'", "ends at byte 56"]),
        ({"a": {"data_offsets": [0, 20]}}, ["'a'", "needs 24 bytes"]),
        ({"a": {"shape": [3, 3]}}, ["'a'", "needs 36 bytes"]),
        ({"a": {"dtype": "Q7"}}, ["'a'", "dtype 'Q7'"]),
        ({"a": {"data_offsets": [24, 0]}}, ["'a'", "invalid data_offsets"]),
        ({"a": {"shape": [2, -3]}}, ["'a'", "invalid shape"]),
    ],
)
def test_header_that_lies_about_offsets(two_tensor_file, overrides, fragments):
    path = two_tensor_file("lying.safetensors", **overrides)
    fails(path, str(path), *fragments)


def test_extra_bytes_after_last_tensor(two_tensor_file, tmp_path):
    path = two_tensor_file()
    padded = tmp_path / "padded.safetensors"
    padded.write_bytes(path.read_bytes() + b"\x00" * 8)
    fails(padded, str(padded), "8 bytes after the last tensor")


def write_sharded(folder: Path, weight_map: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"a": torch.ones(2)}, str(folder / "part-1.safetensors"), metadata={"format": "pt"})
    save_file({"b": torch.zeros(3)}, str(folder / "part-2.safetensors"), metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 20}, "weight_map": weight_map}))
    return index


def test_index_is_read_when_valid(tmp_path):
    write_sharded(tmp_path / "ok", {"a": "part-1.safetensors", "b": "part-2.safetensors"})
    reader = open_checkpoint(tmp_path / "ok")
    assert reader.tensor_names() == ["a", "b"] and torch.equal(reader.get("b"), torch.zeros(3))


def test_index_naming_a_missing_shard(tmp_path):
    index = write_sharded(tmp_path / "m", {"a": "part-1.safetensors", "b": "part-3.safetensors"})
    fails(tmp_path / "m", str(index), "'b'", "part-3.safetensors", "does not exist")


def test_index_naming_a_tensor_its_shard_lacks(tmp_path):
    index = write_sharded(tmp_path / "m", {"a": "part-1.safetensors", "b": "part-1.safetensors"})
    fails(tmp_path / "m", str(index), "'b'", "no such tensor")


@pytest.mark.parametrize("entry", ["../outside.safetensors", "sub/../../outside.safetensors", "ABSOLUTE"])
def test_index_pointing_outside_the_folder(tmp_path, entry):
    save_file({"b": torch.zeros(3)}, str(tmp_path / "outside.safetensors"))
    if entry == "ABSOLUTE":
        entry = str(tmp_path / "outside.safetensors")
    index = write_sharded(tmp_path / "m", {"a": "part-1.safetensors", "b": entry})
    fails(tmp_path / "m", str(index), "'b'", "outside the folder")


def test_index_symlink_escaping_the_folder(tmp_path):
    save_file({"b": torch.zeros(3)}, str(tmp_path / "outside.safetensors"))
    index = write_sharded(tmp_path / "m", {"a": "part-1.safetensors", "b": "link.safetensors"})
    os.symlink(tmp_path / "outside.safetensors", tmp_path / "m" / "link.safetensors")
    fails(tmp_path / "m", str(index), "'b'", "outside the folder")
    # A link that stays inside the folder is fine.
    (tmp_path / "m" / "link.safetensors").unlink()
    os.symlink("part-2.safetensors", tmp_path / "m" / "link.safetensors")
    assert torch.equal(open_checkpoint(tmp_path / "m").get("b"), torch.zeros(3))


def test_malformed_index(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    index = folder / "model.safetensors.index.json"
    index.write_text("{not json")
    fails(folder, str(index), "not valid JSON")
    index.write_text(json.dumps({"metadata": {}}))
    fails(folder, str(index), "weight_map")


def state_dict() -> dict[str, torch.Tensor]:
    return {"model.embed_tokens.weight": torch.randn(5, 4), "lm_head.weight": torch.randn(5, 4)}


@pytest.mark.parametrize("layout", ["folder-bin", "single-pt", "sharded-bin"])
def test_pickle_refused_without_allow_pickle_and_loaded_with_it(tmp_path, layout):
    weights = state_dict()
    if layout == "folder-bin":
        source = tmp_path / "model"
        source.mkdir()
        torch.save(weights, source / "pytorch_model.bin")
        named = source / "pytorch_model.bin"
    elif layout == "single-pt":
        source = named = tmp_path / "weights.pt"
        torch.save(weights, source)
    else:
        source = tmp_path / "model"
        source.mkdir()
        torch.save({"model.embed_tokens.weight": weights["model.embed_tokens.weight"]},
                   source / "pytorch_model-00001-of-00002.bin")
        torch.save({"lm_head.weight": weights["lm_head.weight"]}, source / "pytorch_model-00002-of-00002.bin")
        named = source / "pytorch_model.bin.index.json"
        named.write_text(json.dumps({"weight_map": {
            "model.embed_tokens.weight": "pytorch_model-00001-of-00002.bin",
            "lm_head.weight": "pytorch_model-00002-of-00002.bin"}}))
    fails(source, str(named), "--allow-pickle")

    reader = open_checkpoint(source, allow_pickle=True)
    assert sorted(reader.tensor_names()) == sorted(weights)
    for name, tensor in weights.items():
        assert reader.shape(name) == tuple(tensor.shape) and reader.dtype(name) == torch.float32
        assert torch.equal(reader.get(name), tensor)
        assert torch.equal(reader.get(name, dtype=torch.float16), tensor.half())
    reader.get("lm_head.weight").zero_()  # a caller's in-place edit must not reach the reader
    assert torch.equal(reader.get("lm_head.weight"), weights["lm_head.weight"])


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickle_with_code_is_refused_even_when_allowed(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "x": Payload()}, path)
    fails(path, str(path), "weights_only", allow_pickle=True)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"definitely not a pickle")
    fails(junk, str(junk), allow_pickle=True)
    nested = tmp_path / "nested.pt"
    torch.save({"state": {"w": torch.ones(2)}}, nested)
    fails(nested, str(nested), "'state'", allow_pickle=True)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values(tmp_path, bad):
    path = tmp_path / "model.safetensors"
    save_file({"fine": torch.ones(3), "broken.weight": torch.tensor([1.0, bad, 2.0])}, str(path))
    reader = open_checkpoint(path)
    assert torch.equal(reader.get("fine"), torch.ones(3))
    with pytest.raises(CheckpointError) as info:
        reader.get("broken.weight")
    assert str(path) in str(info.value) and "'broken.weight'" in str(info.value)
    assert "NaN or Inf" in str(info.value)
    assert reader.get("broken.weight", check_finite=False)[1].item() != 1.0  # explicitly allowed


def test_overflow_on_conversion(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"big": torch.tensor([1e6, 1.0])}, str(path))
    with pytest.raises(CheckpointError, match=r"model.safetensors.*'big'.*float16"):
        open_checkpoint(path).get("big", dtype=torch.float16)


def test_missing_tensor_and_missing_paths(tmp_path, two_tensor_file):
    path = two_tensor_file()
    with pytest.raises(CheckpointError, match=r"model.safetensors.*'c'"):
        open_checkpoint(path).get("c")
    fails(tmp_path / "nope", str(tmp_path / "nope"), "no such file or folder")
    fails("./not/here", "./not/here", "no such file or folder")
    fails(str(tmp_path / "x.safetensors"), "x.safetensors", "no such file or folder")
    (tmp_path / "empty").mkdir()
    fails(tmp_path / "empty", str(tmp_path / "empty"), "no weights found")
    (tmp_path / "notes.txt").write_text("hi")
    fails(tmp_path / "notes.txt", "notes.txt", "not a weight file")
    many = tmp_path / "many"
    many.mkdir()
    shutil.copy(path, many / "one.safetensors")
    shutil.copy(path, many / "two.safetensors")
    fails(many, str(many), "several weight files")


# -- issue 18: deep JSON, sources that change while read, staging -------------------------------

def test_deeply_nested_header_and_index(tmp_path, raw_safetensors):
    import struct

    deep = b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    deep += b" " * (-len(deep) % 8)
    path = tmp_path / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(deep)) + deep)
    fails(path, "nested too deeply")
    folder = tmp_path / "deep_index"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text('{"weight_map":' + "[" * 200_000 + "]" * 200_000 + "}")
    fails(folder, "model.safetensors.index.json", "nested too deeply")


def test_file_replaced_between_header_and_data(tmp_path, two_tensor_file):
    import os
    import shutil

    path = two_tensor_file()
    twin = tmp_path / "twin.safetensors"
    shutil.copy(path, twin)
    reader = open_checkpoint(path)
    os.replace(twin, path)  # same bytes, another file
    with pytest.raises(CheckpointError, match="replaced by another file since its header was read"):
        reader.get(reader.tensor_names()[0])
    reader.close()


def test_check_unchanged_names_a_rewritten_file(two_tensor_file):
    import os

    path = two_tensor_file()
    with open_checkpoint(path) as reader:
        reader.get(reader.tensor_names()[0])
        reader.check_unchanged()
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
        with pytest.raises(CheckpointError, match=f"{path}: the file was rewritten"):
            reader.check_unchanged()


def test_mapped_reads_stop_when_a_writer_waits_on_the_lease(tmp_path):
    """A truncation waits on the read lease; the next mapped read refuses instead of dying of SIGBUS."""
    import os
    import threading
    import time

    from shoal.checkpoint.file_guard import lease_held

    path = tmp_path / "leased.safetensors"
    save_file({"w": torch.arange(1 << 16, dtype=torch.float32)}, str(path))
    reader = open_checkpoint(path)
    first = reader.map_range("w", 0, 1024)
    assert float(first[5]) == 5.0
    if not reader._leased.get(path):
        reader.close()
        pytest.skip("no read lease on this filesystem")
    done = threading.Event()
    truncating = threading.Thread(target=lambda: (os.truncate(path, 8), done.set()))
    truncating.start()
    fd = reader._fds[path]
    while lease_held(fd):
        time.sleep(0.01)
    assert not done.is_set()  # the truncation waits for the lease
    with pytest.raises(CheckpointError, match="opened the file for writing or truncated it"):
        reader.map_range("w", 1024, 2048)
    del first
    reader.close()
    truncating.join(timeout=60)
    assert done.is_set() and path.stat().st_size == 8


def test_staging_removes_stale_folders_only(tmp_path, caplog):
    import os
    import subprocess
    import sys

    from shoal.checkpoint.staging import _host, staged_output

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    destination = tmp_path / "out"
    stale = tmp_path / f".out.staging-{gone.pid}@{_host()}-aaaa1111"
    alive = tmp_path / f".out.staging-{os.getpid()}@{_host()}-bbbb2222"
    elsewhere = tmp_path / f".out.staging-{gone.pid}@otherhost-cccc3333"  # another machine's (shared disk)
    other_out = tmp_path / f".other.staging-{gone.pid}@{_host()}-dddd4444"
    for folder in (stale, alive, elsewhere, other_out):
        folder.mkdir()
    with staged_output(destination) as stage:
        (stage / "x").write_text("1")
    assert (destination / "x").read_text() == "1"
    assert not stale.exists() and alive.exists() and elsewhere.exists() and other_out.exists()
    assert any("removed 1 staging folder" in r.getMessage() and stale.name in r.getMessage() for r in caplog.records)


def test_staging_disk_full_removes_everything(tmp_path):
    import errno

    from shoal.checkpoint.staging import staged_output

    with pytest.raises(CheckpointError, match=r"out: no space left on the device .*needs at least"):
        with staged_output(tmp_path / "out") as stage:
            (stage / "part").write_bytes(b"x" * 10_000)
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []
