"""Evaluate candidates on a Ray cluster (extra ``ray``).

Each Ray task is one worker process running trials of the same Optuna study, so the storage
URL must be reachable from every node (PostgreSQL, or a SQLite/journal file on a shared disk).
On a cluster with GPUs every worker takes one GPU: one candidate per GPU at a time.
"""

from __future__ import annotations

import os
import time
from typing import Any

from shoal.errors import ConfigError
from shoal.evolve.config import EvolveConfig
from shoal.progress import ProgressFn, no_progress


def run_on_ray(config: EvolveConfig, storage: str, workers: int, *,
               progress: ProgressFn = no_progress, study_name: str | None = None) -> None:
    try:
        import ray
    except ImportError:
        raise ConfigError("executor='ray' needs Ray: pip install 'shoal[ray]'") from None
    from shoal.evolve.run import _worker
    from shoal.evolve.search import finished_trials

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
                 log_to_driver=False)
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    device = "cuda" if gpus else config.device
    data = config.model_copy(update={"device": device}).model_dump(mode="json")
    task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=0)(_worker)
    from shoal.evolve.search import STUDY_NAME

    name = study_name or STUDY_NAME
    pending = [task.remote(data, storage, 1, name) for _ in range(max(1, workers))]
    study = _load(storage, name)
    total = config.search.trials
    while pending:
        done, pending = ray.wait(pending, timeout=1.0)
        for ref in done:
            try:
                ray.get(ref)
            except Exception as err:  # a worker died: report it, the study keeps its trials
                raise ConfigError(f"a Ray worker failed: {str(err).splitlines()[0]}") from None
        progress("evolve", min(finished_trials(study), total), total)
        time.sleep(0.2)


def _load(storage: str, name: str) -> Any:
    import optuna

    from shoal.evolve.search import make_storage

    return optuna.load_study(study_name=name, storage=make_storage(storage))
