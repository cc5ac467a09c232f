"""One resolver for every model reference: folders, files, hub ids with @revision, schemes and
folder rules that other packages plug in (zoo: and evolve run folders through entry points)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shoal.checkpoint import references
from shoal.checkpoint.references import (ModelLocation, register_folder_rule, register_scheme, registered_schemes,
                                         resolve_model_ref, resolve_reference)
from shoal.errors import CheckpointError, ShoalError


@pytest.fixture()
def clean_registry(monkeypatch):  # type: ignore[no-untyped-def]
    """Registrations made by a test are undone after it."""
    monkeypatch.setattr(references, "_schemes", dict(references._schemes))
    monkeypatch.setattr(references, "_folder_rules", dict(references._folder_rules))
    monkeypatch.setattr(references, "_loaded_groups", set(references._loaded_groups))


def test_local_folders_and_files_resolve_to_themselves(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    weights = folder / "model.safetensors"
    weights.write_bytes(b"")
    assert resolve_reference(str(folder)) == ModelLocation(str(folder), folder)
    assert resolve_reference(weights).path == weights and resolve_reference(weights).is_local
    with pytest.raises(CheckpointError, match="missing: no such file or folder"):
        resolve_reference(tmp_path / "missing")
    with pytest.raises(CheckpointError, match=r"\./nope: no such file or folder"):
        resolve_reference("./nope")


def test_hub_ids_keep_their_revision() -> None:
    pinned = resolve_reference("owner/name@v1.0")
    assert (pinned.path, pinned.hub_id, pinned.revision) == (None, "owner/name", "v1.0")
    assert str(pinned) == "owner/name@v1.0"
    asked = resolve_reference("owner/name", revision="main")
    assert (asked.hub_id, asked.revision) == ("owner/name", "main")
    assert resolve_model_ref("owner/name@v1.0") == "owner/name@v1.0"
    with pytest.raises(CheckpointError, match="contradicts"):
        resolve_reference("owner/name@v1", revision="v2")


def test_schemes_resolve_through_their_plug_in(tmp_path: Path, clean_registry) -> None:  # type: ignore[no-untyped-def]
    target = tmp_path / "target"
    target.mkdir()
    register_scheme("mine", lambda rest: tmp_path / rest)
    location = resolve_reference("mine:target")
    assert location.path == target and location.reference == "mine:target"
    assert "mine" in registered_schemes() and "zoo" in registered_schemes()
    with pytest.raises(ValueError, match="already registered"):
        register_scheme("mine", lambda rest: rest)
    with pytest.raises(ValueError, match="scheme name"):
        register_scheme("Bad Name", lambda rest: rest)
    register_scheme("loop", lambda rest: f"loop:{rest}")
    with pytest.raises(CheckpointError, match="loop"):
        resolve_reference("loop:x")
    with pytest.raises(CheckpointError, match=r"unknown reference scheme 'nope' \(known: .*zoo:"):
        resolve_reference("nope:thing")


def test_folder_rules_map_a_folder_to_what_it_stands_for(tmp_path: Path, clean_registry) -> None:  # type: ignore[no-untyped-def]
    inner = tmp_path / "outer" / "inner"
    inner.mkdir(parents=True)
    register_folder_rule("into_inner", lambda folder: folder / "inner" if (folder / "inner").is_dir() else None)
    assert resolve_reference(str(tmp_path / "outer")).path == inner
    assert resolve_reference(str(inner)).path == inner


def test_a_finished_evolve_run_folder_stands_for_its_model(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    assert resolve_reference(str(run)).path == run  # no config.yaml: not a finished run
    (run / "config.yaml").write_text("models: []\n")
    assert resolve_reference(str(run)).path == run / "model"
    assert resolve_model_ref(str(run)) == str(run / "model")


class _FakeWorld:
    def __init__(self, root: Path, size: str, seed: int) -> None:
        self.root, self.size, self.seed = root, size, seed

    def model(self, name: str) -> Path:
        path = self.root / f"{self.size}-seed{self.seed}" / name
        path.mkdir(parents=True, exist_ok=True)
        return path


def test_zoo_references_carry_the_world_seed(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import shoal.zoo.build as build
    from shoal.zoo import ZooError, zoo_reference

    built: list[tuple[str, int]] = []

    def fake_build(size: str, *, seed: int = 0, **_: object) -> _FakeWorld:
        built.append((size, seed))
        return _FakeWorld(tmp_path, size, seed)

    monkeypatch.setattr(build, "build_zoo", fake_build)
    assert resolve_reference("zoo:small/math").path == tmp_path / "small-seed0" / "math"
    assert resolve_reference("zoo:small@1/math").path == tmp_path / "small-seed1" / "math"
    assert built == [("small", 0), ("small", 1)]
    assert zoo_reference("small", "math") == "zoo:small/math"
    assert zoo_reference("small", "math", 2) == "zoo:small@2/math"
    for bad in ("zoo:small", "zoo:small@x/math", "zoo:/math", "zoo:small@1/"):
        with pytest.raises(ZooError, match="zoo:SIZE/NAME or zoo:SIZE@SEED/NAME"):
            resolve_reference(bad)
    assert issubclass(ZooError, ShoalError)


def test_a_zoo_world_model_knows_its_worlds_seed(tmp_path: Path) -> None:
    from shoal.eval.registry import task_seed_of_models
    from shoal.zoo.references import world_seed_of_model

    world = tmp_path / "world"
    (world / "math").mkdir(parents=True)
    (world / "other").mkdir()
    (world / "manifest.json").write_text(json.dumps({"world_version": 1, "seed": 3, "models": ["math"]}))
    assert world_seed_of_model(world / "math") == 3
    assert world_seed_of_model(world / "other") is None  # not one of the world's models
    assert world_seed_of_model(tmp_path) is None
    assert task_seed_of_models([world / "math", tmp_path]) == 3
    assert task_seed_of_models([tmp_path]) is None
