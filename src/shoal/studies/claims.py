"""The claims benchmark: does evolution beat its baselines on every world seed?

For each world (``zoo:SIZE@SEED``) it runs, with ``shoal demo``'s settings
(:func:`shoal.studies.evolve_demo.demo_config`), the searches and baselines a claim needs, scores
every row on the whole test split of the cross task, and keeps the per-problem scores so each
claim is judged on paired differences (:mod:`shoal.studies.claims_tables`).

Claim sets (``claims``):

- ``ps``: the evolved per-layer DARE-TIES (or TIES) merge (single CMA-ES stage, coarse-to-fine
  ``search.warm_start`` or :func:`portfolio_search`) against the best source (picked on validation),
  an equal-budget uniform search (Optuna over the two uniform genes, density and weight, as many
  trials, top-k re-ranked on validation as the evolved one) and the single-source control (the same
  search with one source held at weight 0) keeping math on every seed, and keeping the best source.
- ``dfs``: data-flow space over math (model A) + lang against the best source, against DFS
  over the math specialist's own layers alone (the config's default scaling; recorded), and against
  its own pick with the lang slots off (:mod:`shoal.studies.claims_dfs`).
- ``psdfs``: DFS over the PS result (model A) + math against PS.
- ``multitask``: per-layer TIES of math + lang + count on the three tasks' mean against an
  equal-budget uniform search; rows hold "kept" per problem (score / the specialist's test score).

Layout of ``out``: ``seed<S>/<run>/`` (each search's run folder, reused with resume semantics),
``seed<S>/scores.json`` (every row's per-problem test scores, reused when the row is unchanged),
and ``claims.json`` + ``claims.md`` (the tables, rebuilt from every ``seed*/scores.json``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from shoal.errors import ConfigError
from shoal.evolve.config import EvolveConfig, parse_evolve_config
from shoal.evolve.saving import BEST_RECIPE
from shoal.merge.recipe import load_recipe
from shoal.progress import ProgressFn, no_progress
from shoal.studies.claims_tables import (Claim, claim_markdown, claim_table, holds, mean_over_seeds, raw_markdown,
                                         searches_markdown)
from shoal.studies.claims_dfs import DFS_SEARCHES, dfs_rows, psdfs_row
from shoal.studies.claims_uniform import uniform_search
from shoal.studies.evolve_demo import (CROSS_TASK, MATH_SPECIALIST, best_source, demo_config,
                                       warm_start_trials)

CLAIM_SETS = ("ps", "dfs", "psdfs", "multitask")
PS_SEARCHES = ("single", "staged", "portfolio")
SCORES_FILE = "scores.json"
MULTITASK_SPECIALISTS = ("math", "lang", "count")

CLAIMS: dict[str, tuple[Claim, ...]] = {
    "ps": (
        Claim("ps_vs_best_source", "PS evolved > best source", "ps evolved", "best source"),
        Claim("ps_vs_uniform_search", "PS evolved > equal-budget uniform search", "ps evolved", "uniform search"),
        Claim("ps_vs_control_math", "PS evolved > single-source control (math on every seed)",
              "ps evolved", "control: math alone"),
        Claim("ps_vs_control_best", "PS evolved > single-source control (the best source)",
              "ps evolved", "control: best source alone"),
    ),
    "dfs": (
        Claim("dfs_vs_best_source", "DFS > best source", "dfs evolved", "best source"),
        Claim("dfs_vs_own_layers", "DFS > its own-layers control (math's layers alone)", "dfs evolved",
              "dfs control: math's own layers"),
        Claim("dfs_lang_layers_add", "DFS's lang layers add to its path (its pick with the lang slots off)",
              "dfs evolved", "dfs evolved, lang slots off"),
    ),
    "psdfs": (
        Claim("psdfs_vs_ps", "PS+DFS ≥ PS", "ps+dfs", "ps evolved", at_least=True),
    ),
    "multitask": (
        Claim("multitask_vs_uniform_search", "multi-task evolved keeps more than the equal-budget "
              "uniform search (kept, points)", "multitask evolved", "multitask uniform search"),
    ),
}


def portfolio_search(trials: int) -> dict[str, Any]:
    """``search.portfolio`` for the PS searches in shares of ``trials`` (at least 4): 5/24 over the two shared
    genes (TPE, as the uniform search), 1/8 over one gene per source (TPE, the shared trials as history), 3/8 to
    CMA-ES from the middle (the single stage's start, step 1/6), the rest from the best point (step 0.2)."""
    if trials < 4:
        raise ConfigError(f"the portfolio search needs at least 4 trials, got {trials}")
    shared, per_source, middle = max(1, trials * 5 // 24), max(1, trials // 8), max(1, trials * 3 // 8)
    return {"shared_trials": shared, "per_source_trials": per_source, "sampler": "tpe",
            "restarts": [{"start": "middle", "trials": middle}, {"start": "best", "sigma0": 0.2}]}


def ps_config(world: Any, *, trials: int, limit: int | None, search: str = "single",
              method: str | None = None) -> EvolveConfig:
    """The demo's PS search on ``world``: ``search`` one of PS_SEARCHES, ``method`` None (the demo's) or "ties"."""
    if search not in PS_SEARCHES:
        raise ConfigError(f"unknown PS search {search!r}; choose from {', '.join(PS_SEARCHES)}")
    config = demo_config(world, trials=trials, limit=limit, seed=world.seed, staged=search == "staged")
    data = config.model_dump(mode="json")
    if search == "portfolio":
        data["search"]["portfolio"] = portfolio_search(trials)
    data["method"] = method or data["method"]
    return parse_evolve_config(data, where="claims PS config")


def _search_label(search: str, trials: int) -> str:
    if search == "portfolio":
        return "portfolio (shared, per-source, CMA-ES restarts from the middle and the best)"
    return "coarse-to-fine" if search == "staged" and warm_start_trials(trials) else "single-stage CMA-ES"


@dataclass
class SeedRun:
    """One world's rows: per-problem test scores, cached in ``seed<S>/scores.json``."""

    world: Any
    out: Path
    trials: int
    limit: int | None
    uniform_sampler: str
    dfs_scaling: str | None
    progress: ProgressFn
    data: dict[str, Any]

    @property
    def path(self) -> Path:
        return self.out / SCORES_FILE

    def stage(self, name: str) -> ProgressFn:
        seed = self.world.seed
        return lambda stage, done, total: self.progress(f"seed {seed} | {name} | {stage}", done, total)

    def row(self, name: str, key: str, compute: Callable[[], tuple[list[float], str]]) -> None:
        """Score row ``name`` unless ``scores.json`` holds it for the same ``key`` (what it is)."""
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        held = self.data["rows"].get(name)
        if held is not None and held.get("key") == digest:
            return
        scores, note = compute()
        self.data["rows"][name] = {"key": digest, "note": note, "mean": sum(scores) / len(scores),
                                   "n": len(scores), "scores": scores}
        self.save()

    def searched(self, name: str, fitness: float, validation: float | None, trials: int,
                 **extra: Any) -> None:
        """Record what a search found (its chosen candidate's fitness and validation scores)."""
        self.data.setdefault("searches", {})[name] = {"fitness": fitness, "validation": validation,
                                                      "trials": trials, **extra}
        self.save()

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.path, json.dumps(self.data, indent=1))


def _test_scores(evaluator: Any, row: Any, task: str = CROSS_TASK) -> list[float]:
    """Per-problem scores of a row (recipe, genome or model folder) on the whole test split."""
    return list(evaluator.score_row(row, task, "test", None).scores)


def run_seed(world: Any, out: str | Path, *, claims: Sequence[str] = ("ps",), trials: int = 120,
             limit: int | None = None, uniform_sampler: str = "tpe", dfs_scaling: str | None = None,
             staged: bool = False, search: str | None = None, method: str | None = None,
             dfs_search: str = "single", progress: ProgressFn = no_progress) -> dict[str, Any]:
    """Run (or resume) every search and row that ``claims`` need on one world; returns the
    content of ``out/scores.json``. ``dfs_scaling``: "matrix" or "per_slot" (None: the evolve
    config's default). ``search``: the PS searches' kind, one of PS_SEARCHES (None: "staged"
    when ``staged``, else "single"). ``dfs_search``: the two-model DFS search, one of DFS_SEARCHES
    ("own_layers_first": ``search.own_layers_first``; the control is one stage either way)."""
    from shoal.evolve.evaluators import Evaluator
    from shoal.evolve.run import evolve, resolve_config

    unknown = [c for c in claims if c not in CLAIM_SETS]
    if unknown:
        raise ConfigError(f"unknown claims {unknown}; choose from {', '.join(CLAIM_SETS)}")
    if dfs_search not in DFS_SEARCHES:
        raise ConfigError(f"unknown DFS search {dfs_search!r}; choose from {', '.join(DFS_SEARCHES)}")
    out = Path(out)
    data = _load_scores(out / SCORES_FILE) or {"seed": world.seed, "world": str(world.root), "rows": {}}
    if data.get("seed") != world.seed:
        raise ConfigError(f"{out / SCORES_FILE} holds seed {data.get('seed')}, not {world.seed}")
    search = search or ("staged" if staged else "single")
    config = resolve_config(ps_config(world, trials=trials, limit=limit, search=search, method=method))
    if data.get("ps_method", "dare_ties" if data["rows"] else config.method) != config.method:
        raise ConfigError(f"{out / SCORES_FILE} holds rows of another method than {config.method}")
    data.update(trials=trials, limit=limit, task=CROSS_TASK, split="test", uniform_sampler=uniform_sampler,
                ps_search=_search_label(search, trials), ps_method=config.method)
    run = SeedRun(world, out, trials, limit, uniform_sampler, dfs_scaling, progress, data)
    math_path = str(world.model(MATH_SPECIALIST))
    needs_ps = any(c in claims for c in ("ps", "psdfs"))

    keep = data.get("best_source")
    if keep is None or keep not in config.models:
        progress(f"seed {world.seed} | best source | validation", 0, 1)
        keep = best_source(config)
        data["best_source"] = keep
        run.save()
    evaluator = Evaluator(config)  # scores every PS row on test: one resident model per world
    try:
        for source in config.models:
            run.row(Path(source).name, source, lambda s=source: (_test_scores(evaluator, s), ""))
        run.row("best source", keep, lambda: (_test_scores(evaluator, keep), Path(keep).name))
        if needs_ps:
            result = evolve(config, out / "ps-evolved", resume=True, write_model=False, report=False,
                            progress=run.stage("ps evolved"))
            run.searched("ps evolved", result.best_fitness, result.best_validation, result.trials)
            recipe = load_recipe(out / "ps-evolved" / BEST_RECIPE)
            run.row("ps evolved", recipe.to_yaml(), lambda: (_test_scores(evaluator, recipe), ""))
        if "ps" in claims:
            _ps_baselines(run, config, evaluator, keep, math_path)
    finally:
        evaluator.close()
    if "dfs" in claims:
        dfs_rows(run, math_path, dfs_search)
    if "psdfs" in claims:
        psdfs_row(run, math_path)
    if "multitask" in claims:
        _multitask_rows(run)
    return data


def _ps_baselines(run: SeedRun, config: EvolveConfig, evaluator: Any, keep: str, math_path: str) -> None:
    from shoal.evolve.run import evolve

    found = uniform_search(evaluator, run.out / "uniform-search", trials=run.trials,
                           sampler=run.uniform_sampler, seed=run.world.seed,
                           progress=run.stage("uniform search"))
    note = f"density {found.values['density']:.2f}, weight {found.values['weight']:.2f}"
    run.row("uniform search", found.recipe.to_yaml(), lambda: (_test_scores(evaluator, found.recipe), note))
    run.searched("uniform search", found.fitness, found.validation, found.trials,
                 sampler=run.uniform_sampler, values=found.values)
    for name, kept in (("control: math alone", math_path), ("control: best source alone", keep)):
        folder = run.out / f"control-{Path(kept).name}"  # same source, same folder: run once
        control = config.model_copy(update={"hold_at_zero": [m for m in config.models if m != kept]})
        result = evolve(control, folder, resume=True, write_model=False, report=False,
                        progress=run.stage(f"control {Path(kept).name}"))
        run.searched(name, result.best_fitness, result.best_validation, result.trials)
        recipe = load_recipe(folder / BEST_RECIPE)
        run.row(name, recipe.to_yaml(), lambda r=recipe: (_test_scores(evaluator, r), Path(kept).name))


def multitask_config(world: Any, *, trials: int, limit: int | None) -> EvolveConfig:
    """``examples/evolve_multitask.yaml`` on this world: per-layer TIES of math + lang + count."""
    tasks = [world.specialist_task[s] for s in MULTITASK_SPECIALISTS]
    return parse_evolve_config({
        "base_model": str(world.model("base")),
        "models": [str(world.model(s)) for s in MULTITASK_SPECIALISTS],
        "method": "ties",
        "space": {"layer_group_size": 1, "parameters": ["weight", "density"], "ranges": {"weight": [0.0, 2.0]}},
        "fixed": {"normalize": False},
        "fitness": {"task": tasks, "split": "fitness", "limit": limit},
        "validation": {"task": tasks, "split": "validation", "limit": limit, "top_k": 5},
        "report": {"tasks": tasks, "split": "test"},
        "search": {"sampler": "cmaes", "trials": trials, "seed": world.seed},
        "seed": world.seed, "task_seed": world.seed,
    }, where="claims multitask config")


def _multitask_rows(run: SeedRun) -> None:
    """Rows in "kept" per problem: each task's per-problem score over its specialist's test
    score, the three tasks concatenated (their mean is the README's "kept")."""
    from shoal.evolve.evaluators import Evaluator
    from shoal.evolve.run import evolve, resolve_config

    world = run.world
    config = resolve_config(multitask_config(world, trials=run.trials, limit=run.limit))
    result = evolve(config, run.out / "multitask-evolved", resume=True, write_model=False, report=False,
                    progress=run.stage("multitask evolved"))
    run.searched("multitask evolved", result.best_fitness, result.best_validation, result.trials)
    evaluator = Evaluator(config)
    try:
        specialist = {}
        for name in MULTITASK_SPECIALISTS:
            task = world.specialist_task[name]
            scores = _test_scores(evaluator, str(world.model(name)), task)
            specialist[task] = max(sum(scores) / len(scores), 1e-9)
        run.data["multitask_specialists"] = specialist

        def kept(row: Any) -> tuple[list[float], str]:
            values, means = [], []
            for task, top in specialist.items():
                scores = _test_scores(evaluator, row, task)
                values.extend(s / top for s in scores)
                means.append(f"{task} {100 * sum(scores) / len(scores):.1f}")
            return values, ", ".join(means)

        evolved = load_recipe(run.out / "multitask-evolved" / BEST_RECIPE)
        run.row("multitask evolved", evolved.to_yaml() + json.dumps(specialist), lambda: kept(evolved))
        found = uniform_search(evaluator, run.out / "multitask-uniform-search", trials=run.trials,
                               sampler=run.uniform_sampler, seed=world.seed,
                               progress=run.stage("multitask uniform search"))
        run.searched("multitask uniform search", found.fitness, found.validation, found.trials,
                     sampler=run.uniform_sampler, values=found.values)
        run.row("multitask uniform search", found.recipe.to_yaml() + json.dumps(specialist),
                lambda: kept(found.recipe))
    finally:
        evaluator.close()


def _load_scores(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def seed_tables(out: str | Path) -> dict[int, dict[str, Any]]:
    """Every ``out/seed<S>/scores.json``, by seed."""
    tables = {}
    for path in sorted(Path(out).glob(f"seed*/{SCORES_FILE}")):
        data = _load_scores(path)
        if data is not None:
            tables[int(data["seed"])] = data
    return tables


def write_tables(out: str | Path, claims: Sequence[str] = CLAIM_SETS) -> dict[str, Any]:
    """Build the claim tables from ``out/seed*/scores.json``; write ``claims.json`` and
    ``claims.md`` into ``out`` and return the JSON content."""
    out = Path(out)
    tables = seed_tables(out)
    if not tables:
        raise ConfigError(f"{out} holds no seed*/{SCORES_FILE}; run the benchmark first")
    scores = {s: {name: row["scores"] for name, row in t["rows"].items()} for s, t in tables.items()}
    labels = {s: {name: row.get("note", "") for name, row in t["rows"].items()} for s, t in tables.items()}
    result: dict[str, Any] = {"seeds": sorted(tables), "claims": {}, "raw": {
        s: {name: {"mean": row["mean"], "n": row["n"], "note": row.get("note", "")}
            for name, row in t["rows"].items()} for s, t in tables.items()},
        "runs": {s: {k: v for k, v in t.items() if k != "rows"} for s, t in tables.items()}}
    sections = [f"Seeds {', '.join(map(str, sorted(tables)))}; test split of {CROSS_TASK} "
                f"(multi-task rows: kept), differences paired over the same problems.", ""]
    for claim_set in claims:
        for claim in CLAIMS[claim_set]:
            rows = claim_table(claim, scores)
            if not rows:
                continue
            mean, se = mean_over_seeds(rows)
            result["claims"][claim.name] = {
                "title": claim.title, "better": claim.better, "baseline": claim.baseline,
                "at_least": claim.at_least, "mean_diff": mean, "mean_se": se,
                "holds_on": [r.seed for r in rows if holds(claim, r)],
                "fails_on": [r.seed for r in rows if not holds(claim, r)],
                "per_seed": [r.__dict__ | {"holds": holds(claim, r)} for r in rows]}
            sections += [claim_markdown(claim, rows, labels), ""]
    searches = {s: t.get("searches", {}) for s, t in tables.items()}
    if any(searches.values()):
        means = {s: {name: row["mean"] for name, row in t["rows"].items()} for s, t in tables.items()}
        sections += ["**Searches**: the chosen candidate's scores (multi-task: mean accuracy on "
                     "fitness and validation, kept on test)", "", searches_markdown(searches, means), ""]
    sections += ["**Raw test scores** (points ± binomial SE; in brackets what the row was on that seed)", "",
                 raw_markdown(scores, labels), ""]
    _write_atomic(out / "claims.json", json.dumps(result, indent=2))
    _write_atomic(out / "claims.md", "\n".join(sections))
    return result


def _write_atomic(path: Path, text: str) -> None:
    """One process per seed may share ``out``: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
