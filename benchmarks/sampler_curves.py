"""CMA-ES against random search (and TPE) on the same evolve config and trial budget.

Runs the search of one ``shoal evolve`` config once per sampler and seed (same trial budget,
same fitness split), then reads every trial back from the run folders' Optuna studies and
reports, per sampler: the best fitness reached (mean ± standard error over seeds), the number
of trials CMA-ES needs to reach the final best of random search with the same seed, and the
validation score of each run's best trial (the fitness split is what the search sees; the
validation split shows whether the gain holds on unseen problems). Writes ``curves.png``
(best-so-far fitness per trial, mean over seeds with a ±1 SE band, every seed faint) and
``curves.json`` into ``--out``. Killed runs resume: a finished run folder is read, not rerun.

    python benchmarks/sampler_curves.py --out runs/sampler_curves --trials 120 --seeds 0,1,2
    python benchmarks/sampler_curves.py --config examples/evolve_cross.yaml --samplers cmaes,random,tpe

Without ``--config`` the config is the one ``shoal demo`` searches (per-layer DARE-TIES of
the small world's base + language + math specialists on the cross task ``math_b``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch


def _config(args: argparse.Namespace) -> Any:
    from shoal.evolve.config import load_evolve_config
    from shoal.studies.evolve_demo import demo_config
    from shoal.zoo import build_zoo

    if args.config:
        return load_evolve_config(args.config)
    return demo_config(build_zoo(args.size), trials=args.trials, limit=args.limit)


def _run(config: Any, sampler: str, seed: int, trials: int, run_dir: Path) -> dict[str, Any]:
    """Search once (or resume a killed run) and return the per-trial fitness and the best genome."""
    import optuna

    from shoal.evolve.run import load_run_study, resolve_config, search
    from shoal.evolve.search import finished_trials

    config = config.model_copy(update={
        "search": config.search.model_copy(update={"sampler": sampler, "seed": seed, "trials": trials}),
        "seed": seed})
    config = resolve_config(config, run_dir)
    started = time.perf_counter()
    done = 0
    if (run_dir / "study.db").exists():
        done = finished_trials(load_run_study(run_dir))
    evaluator = None
    if done < trials:
        evaluator, study = search(config, run_dir, resume=done > 0 or (run_dir / "study.db").exists())
    else:
        study = load_run_study(run_dir)
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    complete.sort(key=lambda t: t.number)
    values = [float(t.value) for t in complete[:trials]]
    best = max(complete[:trials], key=lambda t: t.value)
    validation = None
    if config.validation is not None:
        from shoal.evolve.evaluators import make_evaluator

        evaluator = evaluator or make_evaluator(config)
        spec = config.validation
        genome = {key: best.params[key] for key in evaluator.gene_keys}
        validation = evaluator.score_genome(genome, spec.task, spec.split, spec.limit).score
    # search time from the study itself, so that a run read back reports what it took
    starts = [t.datetime_start for t in complete[:trials] if t.datetime_start]
    ends = [t.datetime_complete for t in complete[:trials] if t.datetime_complete]
    seconds = (max(ends) - min(starts)).total_seconds() if starts and ends else time.perf_counter() - started
    return {"sampler": sampler, "seed": seed, "values": values, "best": max(values),
            "best_trial": best.number, "validation": validation, "seconds": round(seconds, 1)}


def best_so_far(values: list[float]) -> list[float]:
    out, best = [], -math.inf
    for value in values:
        best = max(best, value)
        out.append(best)
    return out


def trials_to_reach(values: list[float], target: float) -> int | None:
    """1-based number of trials after which the best so far is >= target (None: never)."""
    for i, value in enumerate(best_so_far(values), start=1):
        if value >= target - 1e-12:
            return i
    return None


def _mean_se(xs: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(xs)
    se = statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 0.0
    return mean, se


def summarize(runs: list[dict[str, Any]], samplers: list[str], reference: str = "random") -> list[dict[str, Any]]:
    """One row per sampler: final best and validation (mean ± SE), trials to reach the reference."""
    rows = []
    by_seed = {(r["sampler"], r["seed"]): r for r in runs}
    for sampler in samplers:
        mine = [r for r in runs if r["sampler"] == sampler]
        best_mean, best_se = _mean_se([r["best"] for r in mine])
        vals = [r["validation"] for r in mine if r["validation"] is not None]
        reach = []
        for r in mine:
            ref = by_seed.get((reference, r["seed"]))
            if ref is not None:
                reach.append(trials_to_reach(r["values"], ref["best"]))
        rows.append({"sampler": sampler, "runs": len(mine), "best_mean": best_mean, "best_se": best_se,
                     "validation": _mean_se(vals) if vals else None, "reach": reach,
                     "seconds": sum(r["seconds"] for r in mine)})
    return rows


def _plot(runs: list[dict[str, Any]], samplers: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for color, sampler in zip(("tab:blue", "tab:orange", "tab:green", "tab:red"), samplers):
        curves = [best_so_far(r["values"]) for r in runs if r["sampler"] == sampler]
        n = min(len(c) for c in curves)
        for curve in curves:
            ax.plot(range(1, n + 1), [100 * v for v in curve[:n]], color=color, alpha=0.25, lw=0.8)
        mean = [statistics.fmean(c[i] for c in curves) for i in range(n)]
        se = [statistics.stdev(c[i] for c in curves) / math.sqrt(len(curves)) if len(curves) > 1 else 0.0
              for i in range(n)]
        xs = range(1, n + 1)
        ax.plot(xs, [100 * m for m in mean], color=color, lw=2, label=f"{sampler} (mean of {len(curves)})")
        ax.fill_between(xs, [100 * (m - s) for m, s in zip(mean, se)], [100 * (m + s) for m, s in zip(mean, se)],
                        color=color, alpha=0.15)
    ax.set_xlabel("trial")
    ax.set_ylabel("best fitness so far (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _table(rows: list[dict[str, Any]], trials: int, reference: str) -> str:
    lines = [f"| sampler | runs | best fitness after {trials} trials (%) | validation of best (%) | "
             f"trials to reach {reference}'s final best (per seed) | search time (s) |",
             "|---|---:|---:|---:|---|---:|"]
    for row in rows:
        val = "–" if row["validation"] is None else f"{100 * row['validation'][0]:.1f} ± {100 * row['validation'][1]:.1f}"
        reach = ", ".join("never" if r is None else str(r) for r in row["reach"]) or "–"
        lines.append(f"| {row['sampler']} | {row['runs']} | {100 * row['best_mean']:.1f} ± {100 * row['best_se']:.1f} | "
                     f"{val} | {reach} | {row['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="evolve config (default: the demo's search)")
    parser.add_argument("--size", default="small", help="zoo world for the default config")
    parser.add_argument("--limit", type=int, default=None, help="fitness/validation examples (default: all)")
    parser.add_argument("--samplers", default="cmaes,random")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--trials", type=int, default=120)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/sampler_curves"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one line per result, not one bar per model load

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    config = _config(args)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in seeds:  # interleaved, so that load on the machine falls on every sampler alike
        for sampler in samplers:
            run = _run(config, sampler, seed, args.trials, args.out / f"{sampler}-seed{seed}")
            runs.append(run)
            val = "–" if run["validation"] is None else f"{100 * run['validation']:.1f}%"
            print(f"{sampler} seed {seed}: best {100 * run['best']:.1f}% (trial {run['best_trial']}), "
                  f"validation {val}, {run['seconds']:.0f} s", flush=True)
    reference = "random" if "random" in samplers else samplers[-1]
    rows = summarize(runs, samplers, reference)
    task = config.fitness.task if isinstance(config.fitness.task, str) else "+".join(config.fitness.task)
    _plot(runs, samplers, args.out / "curves.png", f"{task} ({config.fitness.split} split), {args.trials} trials")
    (args.out / "curves.json").write_text(json.dumps({"runs": runs, "summary": rows}, indent=1))
    print(_table(rows, args.trials, reference))


if __name__ == "__main__":
    main()
