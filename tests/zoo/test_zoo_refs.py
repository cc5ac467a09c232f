"""``zoo:SIZE/NAME`` model references, as recipes, evolve configs and ``shoal eval/svf/adapt`` take them."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal.eval import load_model
from shoal.zoo import ZooError, resolve_zoo_ref


def test_zoo_refs_resolve_to_the_cached_world(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("SHOAL_CACHE", str(tmp_path))
    path = Path(resolve_zoo_ref("zoo:micro/math"))
    assert path == tmp_path / "zoo" / "micro-seed0-v1" / "math" and (path / "config.json").exists()
    assert resolve_zoo_ref("/some/folder") == "/some/folder"
    model, tokenizer = load_model("zoo:micro/math")
    assert model.config.num_hidden_layers == 2 and tokenizer.padding_side == "left"
    with pytest.raises(ZooError, match="zoo:SIZE/NAME"):
        resolve_zoo_ref("zoo:micro")
    with pytest.raises(ZooError, match="no model 'nope'"):
        resolve_zoo_ref("zoo:micro/nope")
