"""Evolutionary model merging (arXiv 2403.13187): search spaces, the Optuna loop, candidates
built in memory, parallel workers and the run report.

Names are imported on first use, so that the run-folder reference rule
(:mod:`shoal.evolve.references`, an entry point) loads neither torch nor optuna.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EvolveConfig": "shoal.evolve.config", "load_evolve_config": "shoal.evolve.config",
    "parse_evolve_config": "shoal.evolve.config",
    "SearchSpace": "shoal.evolve.space", "build_space": "shoal.evolve.space",
    "from_range": "shoal.evolve.space", "to_range": "shoal.evolve.space",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'shoal.evolve' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
