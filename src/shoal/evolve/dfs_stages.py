"""A data-flow search that cannot lose its own-layers subspace (``search.own_layers_first``).

The DFS genome over models A, B, ... holds every path over model A's layers alone: with every
other model's indicator genes off, the slots of A's layers and the entries of W between them
decode exactly as the genome of a DFS search over A alone (same ``repeats``, ``max_hops``,
scaling and range) decodes (:func:`embed`). A one-stage CMA-ES over the larger genome need not
find that region, so a two-model search can end below the own-layers control. Two stages, one
budget:

1. **own layers** (``own_layers_first.trials``, default half of ``search.trials``;
   ``<study>.own-layers``): CMA-ES over the genome of model A's layers alone, every trial
   evaluated as the full genome it stands for (every other model's slots off, the W entries
   that touch them at scale 1). Its genes, start (A's own layers, scales 1), sampler, seed
   and step are the own-layers control's, so on the same fitness it asks for the control's
   first candidates, value for value.
2. **every gene** (the rest; the run's study): CMA-ES over the whole genome, its mean at the
   best stage-1 trial (lowest number on ties) and step ``own_layers_first.sigma0``
   (default: ``search.sigma0``, else 1/6). That point is its first trial, so the run never
   ends below stage 1's best fitness.

The budget is exact (failed and killed candidates are re-run), ``--resume`` continues the stage
the run was killed in (stage 2 from the same start point), and the final candidate is the best
on validation among the top-k fitness trials of both stages (a genome seen twice, as stage 2's
first trial is, counts once). ``own_layers_first.json`` in the run folder records when each
stage started, stage 2's start (trial, fitness, ``x0``, step) and the pick.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

from shoal.errors import ConfigError
from shoal.evolve.config import EvolveConfig, SearchSpec
from shoal.evolve.search import finished_trials, make_sampler, open_study, run_trials
from shoal.evolve.workers import Evaluations, Outcome
from shoal.flow.genes import from_range
from shoal.flow.genome import DfsSpace
from shoal.progress import ProgressFn, no_progress

RECORD_FILE = "own_layers_first.json"
STAGE_SUFFIX = ".own-layers"
START_ATTR = "own_layers_start"  # stage 2's first trial: the stage-1 trial it repeats


def own_layers_space(space: DfsSpace) -> DfsSpace:
    """The DFS space over the first model's layers alone, with ``space``'s other settings."""
    return DfsSpace(replace(space.layout, layer_counts=space.layout.layer_counts[:1]))


def embed(genome: Mapping[str, float], own: DfsSpace, full: DfsSpace) -> dict[str, float]:
    """The full genome whose path is the own-layers genome's path: slot ``t`` of the own layout
    (pass ``t // M_A``, layer ``t % M_A``) is slot ``(t // M_A) * M + t % M_A`` of the full one,
    model A's W block keeps its indices (model A's layers come first), every other slot is off
    and every other scale gene is at scale 1."""
    m_own, m_full = own.num_layers, full.num_layers
    margin = full.layout.init_margin
    out = {key: 0.5 - margin for key in full.indicator_keys()}
    one = from_range(1.0, *full.layout.scale_range)
    out.update({key: one for key in full.scale_keys()})

    def slot(t: int) -> int:
        return (t // m_own) * m_full + t % m_own

    for t in range(own.num_slots):
        out[f"I{slot(t)}"] = float(genome[f"I{t}"])
    if full.layout.scaling == "matrix":
        for i in range(m_own):
            for j in range(m_own):
                out[f"W{i}.{j}"] = float(genome[f"W{i}.{j}"])
    else:
        for t in range(own.num_slots):
            out[f"S{slot(t)}"] = float(genome[f"S{t}"])
    return out


class _Embedded:
    """Evaluations of own-layers genomes as the full genomes they stand for."""

    def __init__(self, inner: Evaluations, own: DfsSpace, full: DfsSpace):
        self.inner, self.own, self.full, self.capacity = inner, own, full, inner.capacity

    def submit(self, key: int, genome: dict[str, float]) -> None:
        self.inner.submit(key, embed(genome, self.own, self.full))

    def collect(self) -> list[Outcome]:
        return self.inner.collect()

    def close(self) -> None:  # the caller closes the inner evaluations
        pass


def stage1_spec(search: SearchSpec) -> SearchSpec:
    """Stage 1's sampler settings: the own-layers control's (same seed, step and population)."""
    return search.model_copy(update={"own_layers_first": None})


def stage2_spec(search: SearchSpec) -> SearchSpec:
    olf = search.own_layers_first
    assert olf is not None
    sigma0 = olf.sigma0 if olf.sigma0 is not None else search.sigma0
    return search.model_copy(update={"own_layers_first": None, "sigma0": sigma0})


def open_stage1(storage: str, study_name: str, own: DfsSpace, search: SearchSpec) -> Any:
    """The own-layers study (created, or loaded to resume: the run's own study was checked for
    ``resume`` first, and this one belongs to it)."""
    study = open_study(storage, own.keys, stage1_spec(search), resume=True, x0=own.default_genome(),
                       study_name=study_name + STAGE_SUFFIX)
    study.set_user_attr("stage", "own layers: the first model's layers alone")
    return study


def _complete(study: Any) -> list[Any]:
    import optuna

    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def best_trial(study: Any) -> Any:
    done = _complete(study)
    if not done:
        raise ConfigError("the own-layers stage completed no candidate; see its failed trials' errors "
                          "in the study")
    return sorted(done, key=lambda t: (-t.value, t.number))[0]


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def run_own_layers_first(study: Any, config: EvolveConfig, space: DfsSpace, evaluations: Evaluations, *,
                         storage: str, study_name: str, run_dir: Path,
                         progress: ProgressFn = no_progress) -> Any:
    """Run (or resume) both stages until the run holds ``search.trials`` completed trials: stage 1's
    share in the own-layers study, the rest in ``study``. Returns the own-layers study."""
    search = config.search
    olf = search.own_layers_first
    if olf is None:
        raise ConfigError("search.own_layers_first is not set: this run has one stage")
    total, first = search.trials, olf.stage_trials(search.trials)
    own = own_layers_space(space)
    stage1 = open_stage1(storage, study_name, own, search)
    record = _read(run_dir / RECORD_FILE)
    record.update(trials=total, stage1_trials=first, stage2_trials=total - first)
    if "stage1" not in record:
        record["stage1"] = {"study": stage1.study_name, "started": _now(), "genes": len(own.keys),
                            "layer_counts": list(own.layout.layer_counts)}
    _write_json(run_dir / RECORD_FILE, record)

    def stage1_progress(stage: str, done: int, _total: int | None) -> None:
        progress(stage, done, total)

    run_trials(stage1, own.keys, _Embedded(evaluations, own, space), first, progress=stage1_progress)
    start = best_trial(stage1)
    x0 = embed(start.params, own, space)
    spec = stage2_spec(search)
    previous = record.get("stage2", {})
    record["stage2"] = {"study": study.study_name,
                        "started": previous.get("started", _now()), "from_stage1_trial": start.number,
                        "fitness": start.value, "x0": x0, "genes": len(space.keys),
                        "sigma0": spec.sigma0 if spec.sigma0 is not None else 1 / 6,
                        "path": [[h.model, h.layer, h.scale] for h in space.decode(x0)]}
    _write_json(run_dir / RECORD_FILE, record)
    study.sampler = make_sampler(spec, x0)
    import optuna

    alive = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING)
    if not any(START_ATTR in t.user_attrs for t in study.get_trials(deepcopy=False, states=alive)):
        study.enqueue_trial(x0, user_attrs={START_ATTR: start.number})
    done = finished_trials(stage1)

    def stage2_progress(stage: str, finished: int, _total: int | None) -> None:
        progress(stage, done + finished, total)

    run_trials(study, list(space.keys), evaluations, total - first, progress=stage2_progress)
    return stage1


def _stage1_study(storage: str, study_name: str) -> Any | None:
    import optuna

    from shoal.evolve.search import make_storage

    try:
        return optuna.load_study(study_name=study_name + STAGE_SUFFIX, storage=make_storage(storage))
    except KeyError:
        return None


def completed_trials(study: Any, storage: str, study_name: str) -> int:
    """Completed trials of both stages."""
    stage1 = _stage1_study(storage, study_name)
    return finished_trials(study) + (finished_trials(stage1) if stage1 is not None else 0)


def select_final(evaluator: Any, study: Any, *, storage: str, study_name: str, run_dir: Path | None = None,
                 progress: ProgressFn = no_progress) -> tuple[dict[str, float], float, float | None]:
    """The final genome: the best on validation among the top-k fitness trials of both stages (by
    fitness, stage 1 first, then trial number; a full genome seen before is skipped)."""
    config = evaluator.config
    space: DfsSpace = evaluator.space
    own = own_layers_space(space)
    stage1 = _stage1_study(storage, study_name)
    rows = [(t.value, 0, t.number, embed(t.params, own, space)) for t in (_complete(stage1) if stage1 else [])]
    rows += [(t.value, 1, t.number, {k: float(t.params[k]) for k in space.keys}) for t in _complete(study)]
    if not rows:
        raise ConfigError("no candidate completed; see the failed trials' errors in the study")
    rows.sort(key=lambda r: (-r[0], r[1], r[2]))
    k = config.validation.top_k if config.validation else 1
    picked: list[tuple[float, int, int, dict[str, float]]] = []
    for row in rows:
        if len(picked) == k:
            break
        if all(row[3] != other[3] for other in picked):
            picked.append(row)
    scored = []
    for rank, (fitness, stage, number, genome) in enumerate(picked):
        validation = None
        if config.validation is not None:
            spec = config.validation
            validation = evaluator.score_genome(genome, spec.task, spec.split, spec.limit).score
            progress("validate", rank + 1, len(picked))
        scored.append(((validation if validation is not None else 0.0, fitness, -rank),
                       genome, fitness, validation, stage, number))
    _, genome, fitness, validation, stage, number = max(scored, key=lambda row: row[0])
    if run_dir is not None and (run_dir / RECORD_FILE).exists():
        record = _read(run_dir / RECORD_FILE)
        record["final"] = {"stage": stage + 1, "trial": number, "fitness": fitness, "validation": validation,
                           "candidates": [{"stage": row[4] + 1, "trial": row[5], "fitness": row[2],
                                           "validation": row[3]} for row in scored]}
        _write_json(run_dir / RECORD_FILE, record)
    return genome, fitness, validation


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
