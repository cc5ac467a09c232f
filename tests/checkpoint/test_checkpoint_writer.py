"""ShardedWriter edge cases and staged_output's all-or-nothing behaviour."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from shoal.checkpoint import ShardedWriter, parse_byte_size, staged_output
from shoal.errors import CheckpointError


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            for name in handle.keys():
                assert name not in tensors
                tensors[name] = handle.get_tensor(name)
    return tensors


def test_tensor_larger_than_shard_gets_its_own_shard(tmp_path):
    small = torch.ones(10)  # 40 bytes
    big = torch.arange(100, dtype=torch.float32)  # 400 bytes
    writer = ShardedWriter(tmp_path, max_shard_bytes=100)
    writer.add("a", small)
    writer.add("b", small * 2)
    writer.add("big", big)
    writer.add("c", small * 3)
    weight_map = writer.close()
    assert weight_map == {
        "a": "model-00001-of-00003.safetensors",
        "b": "model-00001-of-00003.safetensors",
        "big": "model-00002-of-00003.safetensors",
        "c": "model-00003-of-00003.safetensors",
    }
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index == {"metadata": {"total_size": 40 * 3 + 400, "total_parameters": 10 * 3 + 100},
                     "weight_map": weight_map}
    written = read_all(tmp_path)
    assert torch.equal(written["big"], big) and torch.equal(written["c"], small * 3)
    assert not list(tmp_path.glob(".*"))  # no temporary shard left behind


def test_views_and_shared_storage_are_written_as_their_own_values(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    writer = ShardedWriter(tmp_path, max_shard_bytes=10_000, filename_prefix="weights")
    writer.add("embed", base)
    writer.add("head", base)  # a tied weight: the same storage under two names
    writer.add("transposed", base.t())
    writer.add("row", base[1])
    writer.add("half", base.to(torch.float16))
    assert writer.close() == {n: "weights.safetensors" for n in ["embed", "head", "transposed", "row", "half"]}
    written = read_all(tmp_path)
    assert torch.equal(written["embed"], base) and torch.equal(written["head"], base)
    assert torch.equal(written["transposed"], base.t().contiguous())
    assert torch.equal(written["row"], base[1])
    assert written["half"].dtype == torch.float16
    with safe_open(str(tmp_path / "weights.safetensors"), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}


def test_writer_rejects_duplicates_and_cleans_up_on_error(tmp_path):
    with pytest.raises(ValueError, match="'x'"):
        with ShardedWriter(tmp_path, max_shard_bytes=8) as writer:
            writer.add("x", torch.ones(4))  # flushed to a temporary shard at once
            writer.add("x", torch.ones(4))
    assert list(tmp_path.iterdir()) == []


def test_staged_output_moves_complete_folder_into_place(tmp_path):
    destination = tmp_path / "nested" / "merged"
    with staged_output(destination) as stage:
        assert stage.parent == destination.parent and stage.name.startswith(".")
        (stage / "config.json").write_text("{}")
        assert not destination.exists()
    assert (destination / "config.json").read_text() == "{}"
    assert sorted(p.name for p in destination.parent.iterdir()) == ["merged"]


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_staged_output_leaves_no_trace_on_failure(tmp_path, error):
    destination = tmp_path / "merged"
    with pytest.raises(type(error)):
        with staged_output(destination) as stage:
            (stage / "model-00001-of-00002.safetensors").write_bytes(b"half a model")
            raise error
    assert list(tmp_path.iterdir()) == []


def test_staged_output_refuses_non_empty_destination(tmp_path):
    destination = tmp_path / "merged"
    destination.mkdir()
    (destination / "keep.txt").write_text("old")
    with pytest.raises(CheckpointError, match="merged.*not empty"):
        with staged_output(destination):
            pytest.fail("must refuse before yielding")
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]
    assert (destination / "keep.txt").read_text() == "old"

    file_destination = tmp_path / "file"
    file_destination.write_text("x")
    with pytest.raises(CheckpointError, match="file.*not a folder"):
        with staged_output(file_destination):
            pass


def test_staged_output_accepts_empty_folder_and_overwrites_when_asked(tmp_path):
    destination = tmp_path / "merged"
    destination.mkdir()
    with staged_output(destination) as stage:
        (stage / "a.txt").write_text("first")
    assert (destination / "a.txt").read_text() == "first"

    with pytest.raises(RuntimeError):
        with staged_output(destination, overwrite=True) as stage:
            (stage / "b.txt").write_text("second")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in destination.iterdir()) == ["a.txt"]  # old output untouched

    with staged_output(destination, overwrite=True) as stage:
        (stage / "b.txt").write_text("second")
    assert sorted(p.name for p in destination.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


@pytest.mark.parametrize(
    "text, size",
    [(1000, 1000), ("1000", 1000), ("500MB", 500_000_000), ("5GB", 5_000_000_000), ("2GiB", 2 * 1024**3),
     ("1.5 kb", 1500), ("64KiB", 65536)],
)
def test_parse_byte_size(text, size):
    assert parse_byte_size(text) == size


@pytest.mark.parametrize("text", ["5XB", "GB", "-3MB", "0", ""])
def test_parse_byte_size_rejects(text):
    with pytest.raises(CheckpointError, match="shard size"):
        parse_byte_size(text)


def test_both_writers_write_the_same_bytes(tmp_path):
    """Tensors learnt one by one (ShardedWriter) and a layout known in advance (ShardWriter, written in
    pieces and out of order) give byte-identical shards: one shard-file writer under both."""
    from shoal.checkpoint.writer import ShardWriter

    tensors = {"a": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(5, dtype=torch.bfloat16),
               "c": torch.tensor(True), "d": torch.arange(40, dtype=torch.int64), "e": torch.zeros(0, 3)}
    with ShardedWriter(tmp_path / "learnt", max_shard_bytes=100) as learnt:
        for name, tensor in tensors.items():
            learnt.add(name, tensor)
    layout = [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    with ShardWriter(tmp_path / "known", layout, max_shard_bytes=100) as known:
        for name in reversed(list(tensors)):
            flat = tensors[name].reshape(-1)
            half = flat.numel() // 2
            known.write(name, flat[half:], half)
            known.write(name, flat[:half])
    files = sorted(p.name for p in (tmp_path / "learnt").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "known").iterdir()) and len(files) == 4  # 3 shards + index
    for name in files:
        assert (tmp_path / "learnt" / name).read_bytes() == (tmp_path / "known" / name).read_bytes(), name
    written = read_all(tmp_path / "learnt")
    assert all(torch.equal(written[n], t) for n, t in tensors.items())


def test_an_empty_output_is_a_loadable_empty_file(tmp_path):
    ShardedWriter(tmp_path).close()
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        assert list(handle.keys()) == [] and handle.metadata() == {"format": "pt"}
