"""Hub ids: which names are tried on the hub, what is downloaded, and how failures read.

No network: ``huggingface_hub.snapshot_download`` is replaced by a fake that serves a local folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from shoal.checkpoint import open_checkpoint
from shoal.checkpoint.hub import looks_like_hub_id
from shoal.errors import CheckpointError


@pytest.mark.parametrize("name", ["gpt2", "Qwen/Qwen2.5-0.5B-Instruct", "org/model_v1.5", "a-b/c-d"])
def test_looks_like_hub_id(name):
    assert looks_like_hub_id(name)


@pytest.mark.parametrize(
    "name", ["./model", "/abs/model", "a/b/c", "model.safetensors", "org/../x", "~/m", "org/-x", "", "a b"]
)
def test_does_not_look_like_hub_id(name):
    assert not looks_like_hub_id(name)


def fake_hub(monkeypatch, repo: Path, calls: list) -> None:
    """snapshot_download that copies the files of ``repo`` matching allow_patterns into a fake cache."""
    import fnmatch

    import huggingface_hub

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        calls.append((repo_id, revision, list(allow_patterns)))
        snapshot = repo.parent / "cache" / f"models--{repo_id.replace('/', '--')}" / "snapshots" / "abc123"
        snapshot.mkdir(parents=True, exist_ok=True)
        for file in repo.iterdir():
            if any(fnmatch.fnmatch(file.name, pattern) for pattern in allow_patterns):
                shutil.copy(file, snapshot / file.name)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)


def test_hub_id_downloads_only_what_a_merge_needs(monkeypatch, tmp_path, tiny_model_dir):
    repo = tmp_path / "remote"
    shutil.copytree(tiny_model_dir("hub-llama", arch="llama"), repo)
    (repo / "tokenizer.json").write_text("{}")
    torch.save({"x": torch.ones(1)}, repo / "pytorch_model.bin")
    (repo / "big-training-log.txt").write_text("no")
    calls: list = []
    fake_hub(monkeypatch, repo, calls)
    monkeypatch.chdir(tmp_path)  # so "org/tiny" is not a local path by accident

    reader = open_checkpoint("org/tiny", revision="v1")
    assert reader.source == "org/tiny"
    assert calls[0][:2] == ("org/tiny", "v1")
    downloaded = sorted(p.name for p in reader.path.iterdir())
    assert downloaded == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
    assert reader.config["model_type"] == "llama"
    local = open_checkpoint(repo)
    assert all(torch.equal(reader.get(n), local.get(n)) for n in local.tensor_names())


def test_hub_repo_with_only_pickle_weights(monkeypatch, tmp_path):
    repo = tmp_path / "remote"
    repo.mkdir()
    torch.save({"w": torch.arange(3.0)}, repo / "pytorch_model.bin")
    calls: list = []
    fake_hub(monkeypatch, repo, calls)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"'org/old'.*allow_pickle=True"):
        open_checkpoint("org/old")
    reader = open_checkpoint("org/old", allow_pickle=True)
    assert torch.equal(reader.get("w"), torch.arange(3.0))
    assert "pytorch_model*.bin" in calls[-1][2] and "pytorch_model*.bin" not in calls[0][2]


def test_hub_shards_may_link_into_the_cache_blobs(monkeypatch, tmp_path):
    import json

    cache = tmp_path / "cache" / "models--org--linked"
    snapshot = cache / "snapshots" / "abc"
    (cache / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    save_file({"w": torch.ones(2)}, str(cache / "blobs" / "deadbeef"))
    (snapshot / "model-00001-of-00001.safetensors").symlink_to("../../blobs/deadbeef")
    (snapshot / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "model-00001-of-00001.safetensors"}}))

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kwargs: str(snapshot))
    monkeypatch.chdir(tmp_path)
    assert torch.equal(open_checkpoint("org/linked").get("w"), torch.ones(2))
    # The same links are outside the folder when the folder is opened as a plain local path.
    with pytest.raises(CheckpointError, match="outside the folder"):
        open_checkpoint(snapshot)


def test_download_failure_is_a_checkpoint_error(monkeypatch, tmp_path):
    import huggingface_hub

    def offline(**kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nmore detail")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"'org/missing'.*not a local file or folder.*couldn't connect"):
        open_checkpoint("org/missing")


def test_a_recipe_names_a_hub_model_at_a_revision(monkeypatch, tmp_path, tiny_model_dir):
    """`model: owner/name@rev` in a recipe downloads that revision (through the one resolver)
    and merges it like a local folder."""
    from click.testing import CliRunner

    from shoal.cli.main import cli

    local = tiny_model_dir("hub-rev-llama", arch="llama")
    repo = tmp_path / "remote"
    shutil.copytree(local, repo)
    calls: list = []
    fake_hub(monkeypatch, repo, calls)
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("merge_method: linear\nmodels:\n  - model: org/tiny@v2\n    parameters: {weight: 1.0}\n"
                      f"  - model: {local}\n    parameters: {{weight: 1.0}}\n")
    result = CliRunner().invoke(cli, ["merge", str(recipe), str(tmp_path / "out"), "-q"])
    assert result.exit_code == 0, result.output
    assert calls and calls[0][:2] == ("org/tiny", "v2")
    merged = open_checkpoint(tmp_path / "out")
    source = open_checkpoint(local)
    assert all(torch.equal(merged.get(n), source.get(n)) for n in source.tensor_names())
