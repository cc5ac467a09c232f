"""What other tools read from a run: the Optuna study (names, metric, decoded trials), the
report page and the model card of the evolved model."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from shoal.evolve.config import parse_evolve_config
from shoal.evolve.run import evolve
from shoal.evolve.study_attrs import (LEGACY_STUDY_NAME, gene_names, portable_recipe, portable_reference,
                                      study_name)

LIMIT = 16


@pytest.fixture(scope="module")
def finished_run(micro_world, tmp_path_factory):
    config = parse_evolve_config({
        "base_model": str(micro_world.model("base")),
        "models": [str(micro_world.model("lang")), str(micro_world.model("math"))],
        "method": "dare_ties",
        "space": {"layer_group_size": 1},
        "fitness": {"task": "math_b", "split": "fitness", "limit": LIMIT},
        "validation": {"task": "math_b", "split": "validation", "limit": LIMIT, "top_k": 2},
        "report": {"tasks": ["math_b"], "split": "test", "limit": LIMIT},
        "search": {"sampler": "cmaes", "trials": 4, "seed": 0},
        "batch_size": 32,
    })
    run = tmp_path_factory.mktemp("runs") / "cross-check"
    result = evolve(config, run)
    return run, result


def test_the_study_reads_well_in_optuna(finished_run):
    import optuna

    from shoal.evolve.evaluators import Evaluator
    from shoal.evolve.run import load_run_study

    run, result = finished_run
    storage = f"sqlite:///{run / 'study.db'}"
    assert [s.study_name for s in optuna.get_all_study_summaries(storage)] == ["cross-check"]
    study = optuna.load_study(study_name="cross-check", storage=storage)  # as optuna-dashboard opens it
    assert study.metric_names == ["math_b (fitness split)"]
    names = study.user_attrs["gene_names"]
    assert set(names) == set(study.trials[0].params)
    assert names["m0.c1.weight"] == "lang.layer0.weight" and names["m1.c1.density"] == "math.layer0.density"
    assert names["m0.c0.weight"] == "lang.embed.weight"
    assert len(set(names.values())) == len(names)

    config = parse_evolve_config(yaml.safe_load((run / "config.yaml").read_text()))
    evaluator = Evaluator(config)
    try:
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        assert len(done) == 4
        for trial in done:
            values = evaluator.space.values(trial.params)
            assert trial.user_attrs["values"] == {names[k]: pytest.approx(v, abs=1e-6) for k, v in values.items()}
            recipe = yaml.safe_load(trial.user_attrs["recipe"])
            assert recipe["merge_method"] == "dare_ties" and len(recipe["models"]) == 2
            assert yaml.safe_load(evaluator.space.decode(trial.params).to_yaml()) == recipe  # no zoo cache here
    finally:
        evaluator.close()
    assert load_run_study(run).study_name == "cross-check"


def test_the_library_leaves_optunas_log_level_alone():
    import optuna

    from shoal.evolve.search import make_sampler
    from shoal.evolve.config import SearchSpec

    before = optuna.logging.get_verbosity()
    try:
        optuna.logging.set_verbosity(optuna.logging.DEBUG)
        make_sampler(SearchSpec(sampler="random"))
        assert optuna.logging.get_verbosity() == optuna.logging.DEBUG
    finally:
        optuna.logging.set_verbosity(before)


def test_old_runs_keep_their_study_name(tmp_path):
    assert study_name(tmp_path / "runs" / "a") == "a"
    assert study_name(tmp_path / "a", existing=[LEGACY_STUDY_NAME]) == LEGACY_STUDY_NAME  # written before
    assert study_name(tmp_path / "a", existing=["a", LEGACY_STUDY_NAME]) == "a"


def test_dfs_genes_have_readable_names():
    from shoal.flow.genome import DfsLayout, DfsSpace

    for scaling, sample in (("matrix", {"W1.3": "scale.math.layer1->lang.layer1"}),
                            ("per_slot", {"S7": "scale.slot7.lang.layer1", "S5": "scale.slot5.math.layer1"})):
        space = DfsSpace(DfsLayout(layer_counts=(2, 2), repeats=2, scaling=scaling))
        names = gene_names(SimpleNamespace(space=space, sources=["/w/math", "/w/lang"]))
        assert set(names) == set(space.keys) and len(set(names.values())) == len(names)
        assert names["I0"] == "slot0.math.layer0" and names["I6"] == "slot6.lang.layer0"
        assert {k: names[k] for k in sample} == sample


def test_zoo_folders_are_written_as_zoo_names(tmp_path, monkeypatch):
    from shoal.merge.recipe import ModelEntry, Recipe
    from shoal.zoo.build import WORLD_VERSION, default_root

    monkeypatch.setenv("SHOAL_CACHE", str(tmp_path / "cache"))
    for seed, name in ((0, "zoo:small/math"), (1, "zoo:small@1/math")):
        world = default_root("small", seed)
        (world / "math").mkdir(parents=True)
        (world / "manifest.json").write_text(json.dumps({"world_version": WORLD_VERSION, "size": "small",
                                                         "seed": seed, "models": ["base", "math"]}))
        assert portable_reference(str(world / "math")) == name
    elsewhere = tmp_path / "copied" / "small-seed0"  # a world built elsewhere keeps its path
    (elsewhere / "math").mkdir(parents=True)
    (elsewhere / "manifest.json").write_text((default_root("small", 0) / "manifest.json").read_text())
    assert portable_reference(str(elsewhere / "math")) == str(elsewhere / "math")
    assert portable_reference(str(tmp_path)) == str(tmp_path)
    recipe = Recipe(merge_method="ties", base_model=str(default_root("small", 0) / "math"),
                    models=[ModelEntry(model=str(default_root("small", 1) / "math"), parameters={"weight": 1.0})])
    portable = portable_recipe(recipe)
    assert (portable.base_model, portable.models[0].model) == ("zoo:small/math", "zoo:small@1/math")


def test_report_page_and_plot(finished_run):
    run, result = finished_run
    page = (run / "report.html").read_text()
    pick = re.search(r"The validation pick is trial (\d+) \(fitness ([\d.]+)%", page)
    assert pick is not None
    assert "best source (" in page and "uniform dare_ties:" in page
    assert (run / "fitness.png").stat().st_size > 0

    from shoal.evolve.report import add_figure

    image = run.parent / "fitness_runs.png"
    image.write_bytes((run / "fitness.png").read_bytes())
    add_figure(run / "report.html", image, "evolved vs control")
    page = (run / "report.html").read_text()
    assert '<img src="../fitness_runs.png"' in page and "evolved vs control" in page


def test_plot_fitness_is_in_percent_with_references_and_the_pick(tmp_path, monkeypatch):
    from shoal.evolve import report

    drawn = {}
    real = report._pyplot

    def spy():
        plt = real()
        original = plt.subplots

        def subplots(*args, **kwargs):
            fig, ax = original(*args, **kwargs)
            drawn["ax"] = ax
            return fig, ax
        monkeypatch.setattr(plt, "subplots", subplots)
        return plt

    monkeypatch.setattr(report, "_pyplot", spy)
    report.plot_fitness({"run": ([0, 1, 2], [0.1, 0.3, 0.2], [0.1, 0.3, 0.3])}, tmp_path / "f.png",
                        references={"best source (math)": 0.25, "uniform dare_ties": 0.15}, pick=(1, 0.3))
    ax = drawn["ax"]
    assert ax.get_ylabel() == "fitness (% correct)"
    assert list(ax.lines[0].get_ydata()) == pytest.approx([10, 30, 30])
    assert [list(line.get_ydata()) for line in ax.lines[1:]] == [[25, 25], [15, 15]]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "best source (math): 25.0%" in labels and "validation pick (trial 1)" in labels


def test_the_evolved_model_card_states_the_search(finished_run):
    from huggingface_hub import ModelCard

    run, result = finished_run
    card = ModelCard.load(run / "model" / "README.md")
    text = card.text
    assert "# Evolved merge" in text and "## Search" in text
    assert "trials: 4 completed (cmaes sampler, seed 0)" in text
    assert "fitness: `math_b` on the `fitness` split, first 16 examples" in text
    assert re.search(r"top 2 fitness trials on `math_b`, `validation` split \(scored [\d.]+%\)", text)
    assert "https://arxiv.org/abs/2403.13187" in text and "https://arxiv.org/abs/2311.03099" in text  # DARE
    evolved = next(s for s in result.scores if s.model == "evolved")
    assert f"| evolved | {100 * evolved.score:.1f} ± {100 * evolved.stderr:.1f} (n={LIMIT}) |" in text
    assert (run / "model" / "shoal_recipe.yaml").read_text() == (run / "best_recipe.yaml").read_text()
