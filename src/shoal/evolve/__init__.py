"""Evolutionary model merging (arXiv 2403.13187): search spaces, the Optuna loop, candidates
built in memory, parallel workers and the run report."""

from shoal.evolve.config import EvolveConfig, load_evolve_config, parse_evolve_config
from shoal.evolve.space import SearchSpace, build_space, from_range, to_range

__all__ = ["EvolveConfig", "SearchSpace", "build_space", "from_range", "load_evolve_config",
           "parse_evolve_config", "to_range"]
