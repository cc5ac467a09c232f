"""Search-variant probe: one PS search on one small world with the demo's settings; prints what it found.

    OMP_NUM_THREADS=1 python benchmarks/search_probe.py SEED NAME WARM SIGMA SAMPLER [DROP_BELOW|-] [HOLD]
    OMP_NUM_THREADS=1 python benchmarks/search_probe.py SEED NAME portfolio [SHARED PER_SOURCE MIDDLE]

WARM > 0: ``search.warm_start: {trials: WARM, sampler: SAMPLER, sigma0: SIGMA, drop_below: DROP_BELOW}``;
WARM = 0: the single CMA-ES stage (SIGMA > 0 sets ``search.sigma0``). HOLD: a specialist held at 0.
WARM = portfolio: ``benchmarks/claims.py --search portfolio``'s search (``shoal.studies.claims.portfolio_search``),
the same config as the claims' evolved row, so the folder can be the claims' ``seed<S>/ps-evolved``;
with SHARED PER_SOURCE MIDDLE, those shares (the restart from the best point takes the rest, step 0.2).
Run folder: $PROBE_DIR if set, else $PROBE_OUT/seed<SEED>-<NAME> (default runs/search-probe), resumed when run again.
"""
import json, os, sys, time
import torch
torch.set_num_threads(1)
from shoal.zoo import build_zoo
from shoal.evolve.run import evolve, resolve_config, load_run_study
from shoal.evolve.config import parse_evolve_config
from shoal.studies.claims import ps_config

seed, name, warm = int(sys.argv[1]), sys.argv[2], sys.argv[3]
world = build_zoo("small", seed=seed)
if warm == "portfolio":
    cfg = ps_config(world, trials=120, limit=None, search="portfolio")
    if len(sys.argv) > 4:
        data = cfg.model_dump(mode="json")
        shared, per_source, middle = (int(a) for a in sys.argv[4:7])
        data["search"]["portfolio"].update(shared_trials=shared, per_source_trials=per_source)
        data["search"]["portfolio"]["restarts"][0]["trials"] = middle
        cfg = parse_evolve_config(data)
    cfg = resolve_config(cfg)
else:
    sigma, sampler = float(sys.argv[4]), sys.argv[5]
    drop = None if len(sys.argv) <= 6 or sys.argv[6] == "-" else float(sys.argv[6])
    hold = sys.argv[7] if len(sys.argv) > 7 else ""
    data = ps_config(world, trials=120, limit=None, search="staged" if int(warm) > 0 else "single").model_dump(mode="json")
    if int(warm) > 0:
        data["search"]["warm_start"] = {"trials": int(warm), "sampler": sampler, "sigma0": sigma, "drop_below": drop}
    elif sigma > 0:
        data["search"]["sigma0"] = sigma
    if hold:
        data["hold_at_zero"] = [str(world.model(hold))]
    cfg = resolve_config(parse_evolve_config(data))
folder = os.environ.get("PROBE_DIR") or f"{os.environ.get('PROBE_OUT', 'runs/search-probe')}/seed{seed}-{name}"
t = time.time()
r = evolve(cfg, folder, resume=True, write_model=False, report=False)
study = load_run_study(folder)
best = max(t_.value for t_ in study.trials if t_.value is not None)
out = {"seed": seed, "name": name, "chosen_fitness": r.best_fitness, "validation": r.best_validation,
       "max_fitness_last_stage": best, "trials": r.trials, "minutes": (time.time() - t) / 60}
if os.path.exists(f"{folder}/portfolio.json"):
    record = json.load(open(f"{folder}/portfolio.json"))
    out["final"] = {k: record["final"][k] for k in ("stage", "trial", "fitness", "validation")}
    out["starts"] = [{k: s.get(k) for k in ("stage", "start", "from_stage", "fitness")} for s in record["stages"]]
print(json.dumps(out))
