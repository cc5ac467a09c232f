"""Evaluate candidates on a Ray cluster (extra ``ray``).

Each worker is a Ray actor holding one resident candidate model; the coordinating process
asks the Optuna sampler for candidates and tells the study their outcomes (see
:mod:`shoal.evolve.workers`), so only the coordinator needs to reach the study's storage and
the trial budget is met exactly. On a cluster with GPUs every actor takes one GPU: one
candidate per GPU at a time.
"""

from __future__ import annotations

import os
from typing import Any

from shoal.errors import ConfigError
from shoal.evolve.config import EvolveConfig
from shoal.evolve.workers import Outcome, WorkerSettings, current_settings


class RayEvaluator:
    """The body of one Ray actor: a resident candidate that scores genomes."""

    def __init__(self, config_data: dict, settings: WorkerSettings):
        import torch

        from shoal.evolve.config import parse_evolve_config
        from shoal.evolve.evaluators import make_evaluator

        torch.set_num_threads(settings.threads)  # the actor's own process
        self.evaluator = make_evaluator(parse_evolve_config(config_data))

    def evaluate(self, key: int, genome: dict[str, float]) -> Outcome:
        from shoal.evolve.workers import evaluate

        return evaluate(self.evaluator.fitness, key, genome)


class RayWorkers:
    """``workers`` Ray actors, one candidate each at a time."""

    def __init__(self, config: EvolveConfig, workers: int, threads: int):
        try:
            import ray
        except ImportError:
            raise ConfigError("executor='ray' needs Ray: pip install 'shoal[ray]'") from None
        self.ray = ray
        if not ray.is_initialized():
            import shoal

            # Workers on other machines run the head's copy of shoal, one torch thread each.
            ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
                     log_to_driver=False,
                     runtime_env={"py_modules": [shoal], "env_vars": {"OMP_NUM_THREADS": "1"}})
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        device = "cuda" if gpus else config.device
        data = config.model_copy(update={"device": device}).model_dump(mode="json")
        actor = ray.remote(num_cpus=threads, num_gpus=gpus, max_restarts=0)(RayEvaluator)
        settings = current_settings(threads)
        self.capacity = max(1, workers)
        self.actors = [actor.remote(data, settings) for _ in range(self.capacity)]
        self.idle = list(range(self.capacity))
        self.pending: dict[Any, tuple[int, int]] = {}  # object ref -> (actor index, key)

    def submit(self, key: int, genome: dict[str, float]) -> None:
        index = self.idle.pop(0)
        self.pending[self.actors[index].evaluate.remote(key, genome)] = (index, key)

    def collect(self) -> list[Outcome]:
        done: list = []
        while not done:
            done, _ = self.ray.wait(list(self.pending), num_returns=1, timeout=1.0)
        outcomes = []
        for ref in done:
            index, key = self.pending.pop(ref)
            try:
                outcomes.append(self.ray.get(ref))
            except Exception as err:  # the actor died (or could not start)
                raise ConfigError(f"Ray worker {index} failed while evaluating trial {key}: "
                                  f"{str(err).strip().splitlines()[0]}") from None
            self.idle.append(index)
        return outcomes

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []
