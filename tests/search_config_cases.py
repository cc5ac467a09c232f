"""Shared by the search-config tests (imported as ``from search_config_cases import ...``): a two-model evolve config around a ``search`` block, parsed."""

from __future__ import annotations

import pytest

from shoal.errors import ConfigError
from shoal.evolve.config import parse_evolve_config


def assert_search_config_error(search: dict, change: dict, words: str) -> None:
    """Parsing a config with ``search`` (DFS when ``change["kind"] == "dfs"``) fails naming ``words``."""
    data = {"models": ["a", "b"], "space": {"layer_group_size": change.get("layer_group_size", 1)},
            "fitness": {"task": "math_b", "split": "fitness"}, "search": search}
    if change.get("kind") == "dfs":
        data.update(kind="dfs")
    else:
        data["base_model"] = "base"
    with pytest.raises(ConfigError) as err:
        parse_evolve_config(data, where="cfg.yaml")
    assert words in str(err.value) and str(err.value).startswith("cfg.yaml")
