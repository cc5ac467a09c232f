"""Claims over world seeds: evolved merges against their baselines, paired on the test split.

    OMP_NUM_THREADS=1 python benchmarks/claims.py --seeds 0 1 2 --size small --trials 120 \
        --claims ps --out runs/claims
    python benchmarks/claims.py --report-only runs/claims      # re-render the tables

Per seed it builds (or loads) the world and runs what the claims need (see
``shoal.studies.claims``); every search's run folder under ``DIR/seed<S>/`` is resumed when run
again, and rows already scored are reused. Writes ``DIR/claims.json`` and ``DIR/claims.md``
(one table per claim over every seed found in DIR, plus the raw scores) and prints the tables.
One process per seed may share DIR (the tables cover whatever seeds are done).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


class ProgressLines:
    """One labelled line per stage start and end, and every 10% in between."""

    def __init__(self) -> None:
        self.last: dict[str, int] = {}
        self.started = time.monotonic()

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        step = max(1, (total or 10) // 10)
        previous = self.last.get(stage)
        if previous is not None and done != total and done - previous < step:
            return
        if previous == done:
            return
        self.last[stage] = done
        minutes = (time.monotonic() - self.started) / 60
        print(f"[{minutes:6.1f} min] {stage}: {done}/{total if total is not None else '?'}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--size", default="small", choices=["micro", "small"])
    parser.add_argument("--trials", type=int, default=120, help="trials per search (every search gets as many)")
    parser.add_argument("--limit", type=int, default=None, help="examples per fitness/validation evaluation")
    parser.add_argument("--claims", default="ps", help="comma-separated: ps,dfs,psdfs,multitask")
    parser.add_argument("--uniform-sampler", default="tpe", choices=["tpe", "cmaes", "random"],
                        help="Optuna sampler of the equal-budget uniform search")
    parser.add_argument("--dfs-scaling", default=None, choices=["matrix", "per_slot"],
                        help="DFS scaling (default: the evolve config's default); recorded per row")
    parser.add_argument("--dfs-search", default="single", choices=["single", "own_layers_first"],
                        help="the two-model DFS search: one CMA-ES stage, or search.own_layers_first (half the "
                             "trials over math's own layers, the control's search, then CMA-ES over every gene "
                             "from the best of them); the own-layers control is one stage either way")
    parser.add_argument("--search", default="single", choices=["single", "staged", "portfolio"],
                        help="the PS searches (evolved and controls): one CMA-ES stage (the demo's), "
                             "coarse-to-fine (search.warm_start, a third of the trials) or the portfolio "
                             "(search.portfolio: shared genes, per-source genes, CMA-ES restarts from the "
                             "middle and from the best point; shoal.studies.claims.portfolio_search)")
    parser.add_argument("--method", default="dare_ties", choices=["dare_ties", "ties"],
                        help="the PS merges' method (evolved, uniform search, controls): the demo's DARE-TIES, "
                             "or TIES (the same genes, no random drop, so no luck in a mask draw)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, default=Path("runs/claims"))
    parser.add_argument("--report-only", type=Path, default=None, metavar="DIR",
                        help="only rebuild DIR/claims.md and claims.json from DIR/seed*/scores.json")
    args = parser.parse_args(argv)

    from shoal.cli._progress import quiet_optuna
    from shoal.errors import ShoalError
    from shoal.studies.claims import CLAIM_SETS, run_seed, write_tables

    quiet_optuna()  # one INFO line per trial otherwise; the progress lines say how a search goes

    claims = [c for c in args.claims.split(",") if c]
    unknown = [c for c in claims if c not in CLAIM_SETS]
    if unknown or not claims:
        print(f"error: --claims: unknown {unknown or 'empty'}; choose from {','.join(CLAIM_SETS)}", file=sys.stderr)
        return 2
    if args.trials < 1:
        print("error: --trials must be at least 1", file=sys.stderr)
        return 2
    try:
        if args.report_only is None:
            import torch
            from transformers.utils import logging as hf_logging

            torch.set_num_threads(args.threads)
            hf_logging.disable_progress_bar()
            from shoal.zoo import build_zoo

            progress = ProgressLines()
            for seed in args.seeds:
                world = build_zoo(args.size, seed=seed, progress=lambda s, d, t, seed=seed:
                                  progress(f"seed {seed} | world | {s}", d, t))
                run_seed(world, args.out / f"seed{seed}", claims=claims, trials=args.trials,
                         limit=args.limit, uniform_sampler=args.uniform_sampler,
                         dfs_scaling=args.dfs_scaling, search=args.search, method=args.method,
                         dfs_search=args.dfs_search,
                         progress=progress)
                write_tables(args.out, claims)
        out = args.report_only or args.out
        write_tables(out, CLAIM_SETS if args.report_only else claims)
    except ShoalError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print((out / "claims.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
