"""The claims benchmark end to end on the micro world (tiny budgets), and its paired statistics
against an independent computation."""

from __future__ import annotations

import importlib.util
import json
import math
import random
from pathlib import Path

import pytest

from shoal.errors import ConfigError
from shoal.studies.claims import CLAIMS, run_seed, write_tables
from shoal.studies.claims_tables import paired_difference

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "claims.py"


def reference_paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean paired difference and its SE, written out the textbook way."""
    n = len(a)
    d = [x - y for x, y in zip(a, b)]
    mean = math.fsum(d) / n
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in d) / (n - 1))
    return mean, sd / math.sqrt(n)


def load_benchmark():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("claims_benchmark", BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paired_difference_matches_a_reference_and_rejects_unpaired_rows() -> None:
    rng = random.Random(3)
    a = [float(rng.random() < 0.4) for _ in range(200)]
    b = [float(rng.random() < 0.3) for _ in range(200)]
    assert paired_difference(a, b) == pytest.approx(reference_paired(a, b), rel=1e-12)
    # a paired SE is not the SE of two independent means: identical rows differ by exactly 0
    assert paired_difference(a, a) == (0.0, 0.0)
    with pytest.raises(ConfigError, match="same problems"):
        paired_difference(a, b[:-1])


def _fake_seed(out: Path, seed: int, rows: dict[str, list[float]]) -> None:
    folder = out / f"seed{seed}"
    folder.mkdir(parents=True)
    (folder / "scores.json").write_text(json.dumps({"seed": seed, "rows": {
        name: {"key": name, "note": "", "mean": sum(s) / len(s), "n": len(s), "scores": s}
        for name, s in rows.items()}}))


def test_tables_over_seeds_give_the_mean_and_where_a_claim_holds(tmp_path: Path) -> None:
    rng = random.Random(0)
    tables = {}
    for seed, (p_evolved, p_source) in {0: (0.6, 0.2), 1: (0.3, 0.3)}.items():
        tables[seed] = {"ps evolved": [float(rng.random() < p_evolved) for _ in range(300)],
                        "best source": [float(rng.random() < p_source) for _ in range(300)]}
        _fake_seed(tmp_path, seed, tables[seed])
    result = write_tables(tmp_path, ["ps"])
    claim = result["claims"]["ps_vs_best_source"]
    per_seed = {row["seed"]: row for row in claim["per_seed"]}
    refs = {s: reference_paired(t["ps evolved"], t["best source"]) for s, t in tables.items()}
    for seed, (mean, se) in refs.items():
        assert per_seed[seed]["diff"] == pytest.approx(100 * mean)
        assert per_seed[seed]["se"] == pytest.approx(100 * se)
        assert per_seed[seed]["n"] == 300
    assert claim["mean_diff"] == pytest.approx(50 * (refs[0][0] + refs[1][0]))
    assert claim["mean_se"] == pytest.approx(50 * math.hypot(refs[0][1], refs[1][1]))
    assert claim["holds_on"] == [0] and claim["fails_on"] == [1]
    assert "ps_vs_uniform_search" not in result["claims"]  # rows it needs were never scored
    md = (tmp_path / "claims.md").read_text()
    assert "**PS evolved > best source**" in md and "| mean |" in md and "| seed 1 |" in md


def test_two_identical_rows_are_no_gain_but_are_at_least_as_good() -> None:
    from shoal.studies.claims_tables import Claim, Difference, holds

    same = Difference(seed=1, better=15.6, baseline=15.6, diff=0.0, se=0.0, n=500)
    assert not holds(Claim("c", "t", "a", "b"), same)
    assert holds(Claim("c", "t", "a", "b", at_least=True), same)
    assert holds(Claim("c", "t", "a", "b"), Difference(1, 16.0, 15.6, 0.4, 0.2, 500))


@pytest.mark.slow
def test_claims_run_end_to_end_on_the_micro_world(tmp_path: Path, micro_world) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "claims"
    stages: list[str] = []
    data = run_seed(micro_world, out / "seed0", claims=["ps", "dfs", "psdfs", "multitask"], trials=2,
                    limit=8, dfs_scaling="matrix", progress=lambda stage, done, total: stages.append(stage))
    rows = data["rows"]
    needed = {c.better for cs in CLAIMS.values() for c in cs} | {c.baseline for cs in CLAIMS.values() for c in cs}
    assert needed <= set(rows)
    for name, row in rows.items():  # the whole test split, per problem (multi-task: 3 tasks)
        assert row["n"] == (1500 if name.startswith("multitask") else 500), name
        assert row["mean"] == pytest.approx(sum(row["scores"]) / row["n"])
    assert data["best_source"] in {str(micro_world.model("math")), str(micro_world.model("lang"))}
    assert rows["best source"]["scores"] == rows[Path(data["best_source"]).name]["scores"]
    assert data["searches"]["dfs evolved"]["scaling"] == "matrix"
    for name in ["ps evolved", "uniform search", "control: math alone", "dfs evolved", "ps+dfs",
                 "multitask evolved", "multitask uniform search"]:
        assert data["searches"][name]["trials"] == 2 and 0 <= data["searches"][name]["validation"] <= 1, name
    assert rows["dfs evolved"]["note"] == "matrix scaling"
    assert {"seed 0 | ps evolved | evolve", "seed 0 | uniform search | evolve",
            "seed 0 | dfs evolved | evolve"} <= set(stages)
    scaling = data["searches"]["dfs evolved"]["scaling"]
    for folder in ["ps-evolved", "uniform-search", "control-math", f"dfs-evolved-{scaling}",
                   f"dfs-control-math-{scaling}", f"psdfs-{scaling}", "multitask-evolved",
                   "multitask-uniform-search"]:
        assert (out / "seed0" / folder / "study.db").exists(), folder

    result = write_tables(out)
    assert set(result["claims"]) == {c.name for cs in CLAIMS.values() for c in cs}
    for name, claim in result["claims"].items():
        (row,) = claim["per_seed"]
        mean, se = reference_paired(rows[claim["better"]]["scores"], rows[claim["baseline"]]["scores"])
        assert row["diff"] == pytest.approx(100 * mean), name
        assert row["se"] == pytest.approx(100 * se), name
        assert claim["mean_diff"] == pytest.approx(row["diff"]) and claim["mean_se"] == pytest.approx(row["se"])
        assert sorted(claim["holds_on"] + claim["fails_on"]) == [0]

    # resumed: every search already holds its trials and every row is reused as it was
    before = (out / "seed0" / "scores.json").read_text()
    again = run_seed(micro_world, out / "seed0", claims=["ps"], trials=2, limit=8)
    assert again["rows"] == json.loads(before)["rows"]
    import optuna

    study = optuna.load_study(study_name="shoal-evolve", storage=f"sqlite:///{out / 'seed0' / 'uniform-search' / 'study.db'}")
    assert len(study.trials) == 2

    # the script: re-render from DIR; bad input is one line and exit 2
    bench = load_benchmark()
    assert bench.main(["--report-only", str(out)]) == 0
    assert "**PS+DFS ≥ PS**" in (out / "claims.md").read_text()
    assert "| ps evolved | " in (out / "claims.md").read_text().split("**Searches**")[1]
    assert bench.main(["--report-only", str(tmp_path / "empty")]) == 2
    assert bench.main(["--claims", "ps,bogus", "--out", str(out)]) == 2


def test_a_changed_uniform_search_is_refused_in_the_same_folder(tmp_path: Path, micro_world) -> None:  # type: ignore[no-untyped-def]
    from shoal.evolve.evaluators import Evaluator
    from shoal.evolve.run import resolve_config
    from shoal.studies.claims_uniform import uniform_search
    from shoal.studies.evolve_demo import demo_config

    evaluator = Evaluator(resolve_config(demo_config(micro_world, trials=1, limit=4)))
    try:
        found = uniform_search(evaluator, tmp_path / "u", trials=1, sampler="tpe")
        assert set(found.values) == {"density", "weight"} and found.trials == 1
        assert all(e.parameters == found.recipe.models[0].parameters for e in found.recipe.models)
        with pytest.raises(ConfigError, match="sampler"):
            uniform_search(evaluator, tmp_path / "u", trials=1, sampler="cmaes")
    finally:
        evaluator.close()


def test_staged_ps_searches_are_coarse_to_fine_and_the_default_is_one_stage(tmp_path: Path, micro_world) -> None:  # type: ignore[no-untyped-def]
    """With ``staged=True`` the evolved merge and both controls run the same staged search (a
    third of the budget in the warm start); the default runs the single CMA-ES stage."""
    from shoal.evolve.stages import WARM_START_FILE

    out = tmp_path / "claims" / "seed0"
    data = run_seed(micro_world, out, claims=["ps"], trials=3, limit=4, staged=True)
    assert data["ps_search"] == "coarse-to-fine"
    folders = ["ps-evolved", "control-math", f"control-{Path(data['best_source']).name}"]
    for folder in folders:
        record = json.loads((out / folder / WARM_START_FILE).read_text())
        assert (record["warm_start_trials"], record["per_layer_trials"]) == (1, 2), folder
    for name in ["ps evolved", "control: math alone", "control: best source alone"]:
        assert data["searches"][name]["trials"] == 3, name  # both stages counted, the budget exact
    # the evolved merge's warm start has a weight and a density per source; the control's only the kept one's
    evolved = json.loads((out / "ps-evolved" / WARM_START_FILE).read_text())
    control = json.loads((out / "control-math" / WARM_START_FILE).read_text())
    assert set(evolved["coarse_genome"]) == {"m0.weight", "m0.density", "m1.weight", "m1.density"}
    assert set(control["coarse_genome"]) == {"m0.weight", "m0.density"}
    single = run_seed(micro_world, tmp_path / "single" / "seed0", claims=["ps"], trials=3, limit=4)
    assert single["ps_search"] == "single-stage CMA-ES"
    assert not (tmp_path / "single" / "seed0" / "ps-evolved" / WARM_START_FILE).exists()


@pytest.mark.parametrize("trials", [4, 5, 24, 120, 121])
def test_the_portfolio_search_shares_the_budget_exactly(trials: int) -> None:
    from shoal.evolve.config import SearchSpec
    from shoal.studies.claims import portfolio_search

    spec = SearchSpec.model_validate({"sampler": "cmaes", "trials": trials, "portfolio": portfolio_search(trials)})
    pf = spec.portfolio
    assert pf is not None
    assert pf.shared_trials + pf.per_source_trials + sum(pf.budgets(trials)) == trials
    assert min([pf.shared_trials, pf.per_source_trials, *pf.budgets(trials)]) >= 1
    if trials == 120:
        assert (pf.shared_trials, pf.per_source_trials, pf.budgets(trials)) == (25, 15, [45, 35])


def test_portfolio_ps_searches_run_every_stage_for_evolved_and_controls(tmp_path: Path, micro_world) -> None:  # type: ignore[no-untyped-def]
    from shoal.evolve.portfolio import PORTFOLIO_FILE
    from shoal.studies.claims import ps_config

    out = tmp_path / "claims" / "seed0"
    data = run_seed(micro_world, out, claims=["ps"], trials=4, limit=4, search="portfolio")
    assert data["ps_search"].startswith("portfolio")
    for folder in ["ps-evolved", "control-math", f"control-{Path(data['best_source']).name}"]:
        record = json.loads((out / folder / PORTFOLIO_FILE).read_text())
        assert [s["trials"] for s in record["stages"]] == [1, 1, 1, 1], folder
        assert [s.get("start") for s in record["stages"]] == [None, None, "middle", "best"], folder
        assert record["final"]["stage"] in {s["stage"] for s in record["stages"]}
    for name in ["ps evolved", "control: math alone", "control: best source alone"]:
        assert data["searches"][name]["trials"] == 4, name  # every stage counted, the budget exact
    with pytest.raises(ConfigError, match="unknown PS search 'both'"):
        ps_config(micro_world, trials=4, limit=4, search="both")


def test_ps_claims_run_with_ties_and_refuse_a_folder_of_another_method(tmp_path: Path, micro_world) -> None:  # type: ignore[no-untyped-def]
    """``method="ties"`` reaches every PS search (evolved, uniform search, controls) and is recorded;
    a folder whose rows were made with another method is refused, not mixed."""
    from shoal.evolve.saving import BEST_RECIPE
    from shoal.merge.recipe import load_recipe

    out = tmp_path / "claims" / "seed0"
    data = run_seed(micro_world, out, claims=["ps"], trials=2, limit=4, method="ties")
    assert data["ps_method"] == "ties"
    for folder in ["ps-evolved", "control-math"]:
        assert load_recipe(out / folder / BEST_RECIPE).merge_method == "ties", folder
    assert json.loads((out / "uniform-search" / "uniform_search.json").read_text())["method"] == "ties"
    with pytest.raises(ConfigError, match="another method than dare_ties"):
        run_seed(micro_world, out, claims=["ps"], trials=2, limit=4)


def test_dfs_claims_with_own_layers_first_and_the_lang_ablations(tmp_path: Path, micro_world) -> None:  # type: ignore[no-untyped-def]
    """``dfs_search="own_layers_first"`` runs the two-model DFS in two stages (half the budget over
    math's own layers) into its own folder, the control in one; the pick is scored with its lang
    slots off and with its lang hops dropped, and those rows are what they say."""
    from shoal.evolve.dfs_stages import RECORD_FILE

    out = tmp_path / "claims" / "seed0"
    data = run_seed(micro_world, out, claims=["dfs"], trials=4, limit=4, dfs_scaling="matrix",
                    dfs_search="own_layers_first")
    record = json.loads((out / "dfs-evolved-matrix-own-layers-first" / RECORD_FILE).read_text())
    assert (record["stage1_trials"], record["stage2_trials"]) == (2, 2)
    assert not (out / "dfs-control-math-matrix" / RECORD_FILE).exists()  # the control: one stage
    searched = data["searches"]["dfs evolved"]
    assert searched["trials"] == 4 and searched["search"] == "own_layers_first"
    rows = data["rows"]
    assert rows["dfs evolved"]["note"] == "matrix scaling, own layers first"
    lang_hops = searched["other_model_hops"]
    assert rows["dfs evolved, lang slots off"]["note"].startswith(f"{lang_hops} of {searched['hops']} hops lang")
    if lang_hops == 0:  # nothing to switch off: the same path, the same scores
        assert rows["dfs evolved, lang slots off"]["scores"] == rows["dfs evolved"]["scores"]
        assert rows["dfs evolved, lang hops dropped"]["scores"] == rows["dfs evolved"]["scores"]
    assert rows["dfs evolved, lang slots off"]["n"] == rows["dfs evolved, lang hops dropped"]["n"] == 500
    with pytest.raises(ConfigError, match="unknown DFS search 'twice'"):
        run_seed(micro_world, out, claims=["dfs"], trials=4, limit=4, dfs_search="twice")


def test_the_lang_ablations_remove_exactly_the_lang_layers() -> None:
    from shoal.flow.genome import DfsLayout, DfsSpace
    from shoal.studies.claims_dfs import lang_slots_off, without_other_models

    space = DfsSpace(DfsLayout(layer_counts=(3, 2), repeats=3, max_hops=None))
    rng = random.Random(1)
    for _ in range(100):
        genome = {k: rng.random() for k in space.keys}
        path = space.decode(genome)
        off = space.decode(lang_slots_off(space, genome))
        assert all(h.model == 0 for h in off)
        # with no path-length limit the same math slots stay on; a hop after a dropped lang hop takes W[prev, it]
        assert [h.key for h in off] == [h.key for h in path if h.model == 0]
        assert [h.key for h in without_other_models(path)] == [h.key for h in off]
        assert [h.scale for h in without_other_models(path)] == [h.scale for h in path if h.model == 0]
