"""Search-variant probe: one PS search on one small world with the demo's settings; prints what it found.

    OMP_NUM_THREADS=1 python benchmarks/search_probe.py SEED NAME WARM SIGMA SAMPLER [DROP_BELOW|-] [HOLD]

WARM > 0: ``search.warm_start: {trials: WARM, sampler: SAMPLER, sigma0: SIGMA, drop_below: DROP_BELOW}``;
WARM = 0: the single CMA-ES stage (SIGMA > 0 sets ``search.sigma0``). HOLD: a specialist held at 0.
Run folder: $PROBE_OUT/seed<SEED>-<NAME> (default runs/search-probe), resumed when run again.
"""
import json, os, sys, time
import torch
torch.set_num_threads(1)
from shoal.zoo import build_zoo
from shoal.evolve.run import evolve, resolve_config, load_run_study
from shoal.studies.evolve_demo import demo_config

seed, name, warm, sigma, sampler = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
drop = None if len(sys.argv) <= 6 or sys.argv[6] == "-" else float(sys.argv[6])
hold = sys.argv[7] if len(sys.argv) > 7 else ""
OUT = os.environ.get("PROBE_OUT", "runs/search-probe")
world = build_zoo("small", seed=seed)
cfg = demo_config(world, trials=120, limit=None, seed=seed, staged=warm > 0)
data = cfg.model_dump(mode="json")
if warm > 0:
    data["search"]["warm_start"] = {"trials": warm, "sampler": sampler, "sigma0": sigma, "drop_below": drop}
elif sigma > 0:
    data["search"]["sigma0"] = sigma
if hold:
    data["hold_at_zero"] = [str(world.model(hold))]
from shoal.evolve.config import parse_evolve_config
cfg = resolve_config(parse_evolve_config(data))
t = time.time()
r = evolve(cfg, f"{OUT}/seed{seed}-{name}", resume=True, write_model=False, report=False)
study = load_run_study(f"{OUT}/seed{seed}-{name}")
best = max(t_.value for t_ in study.trials if t_.value is not None)
print(json.dumps({"seed": seed, "name": name, "chosen_fitness": r.best_fitness, "validation": r.best_validation,
                  "max_fitness_stage2": best, "trials": r.trials, "minutes": (time.time() - t) / 60}))
