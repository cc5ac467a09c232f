"""Data-flow space (layer paths) and PS+DFS runs on the micro world."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from shoal.errors import ConfigError
from shoal.evolve.config import parse_evolve_config
from shoal.evolve.run import evolve, load_run_study, search

LIMIT = 16


def dfs_data(models: list[str], trials: int, **dfs: object) -> dict:
    return {
        "kind": "dfs",
        "models": models,
        "dfs": {"repeats": 2, "max_hops": 6, **dfs},
        "fitness": {"task": "math_b", "split": "fitness", "limit": LIMIT},
        "validation": {"task": "math_b", "split": "validation", "limit": LIMIT, "top_k": 2},
        "report": {"tasks": ["math_b"], "split": "test", "limit": LIMIT},
        "search": {"sampler": "cmaes", "trials": trials, "seed": 0},
        "batch_size": 16,
    }


def completed(run_dir: Path) -> dict[int, tuple]:
    import optuna

    study = load_run_study(run_dir)
    return {t.number: (t.value, t.params) for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE}


def test_dfs_run_resumes_and_writes_a_loadable_path_model(tmp_path: Path, micro_world) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    models = [str(micro_world.model("lang")), str(micro_world.model("math"))]
    run_dir = tmp_path / "dfs"
    first = parse_evolve_config(dfs_data(models, trials=3))
    evaluator, _ = search(first, run_dir)
    evaluator.close()
    before = completed(run_dir)
    assert len(before) == 3
    # the first trial is the paper's starting point: model A's own layers, scales 1
    result = evolve(parse_evolve_config(dfs_data(models, trials=6)), run_dir, resume=True)
    after = completed(run_dir)
    assert len(after) == 6 and all(after[n] == before[n] for n in before)
    best = json.loads((run_dir / "best_path.json").read_text())
    hops = best["path"]
    assert hops[0][:2] == [0, 0] and hops[-1][:2] == [0, 1]  # fixed endpoints of model A (2 layers)
    assert len(hops) <= 6
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    assert type(model).__name__ == "LayerPathForCausalLM"
    assert [list(h)[:2] for h in model.config.path] == [h[:2] for h in hops]
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    evolved = next(s for s in result.scores if s.model == "evolved")
    assert evolved.n == LIMIT and (run_dir / "report.html").exists() and (run_dir / "genome.png").exists()
    # the default genome is the paper's: T = M r indicators and the M x M scaling matrix W
    m = layer_total(models)
    assert first.dfs.scaling == "matrix"
    assert gene_counts(after[0][1]) == {"I": m * 2, "W": m * m}


def layer_total(models: list[str]) -> int:
    """M: the decoder layers of all sources together."""
    return sum(json.loads((Path(s) / "config.json").read_text())["num_hidden_layers"] for s in models)


def gene_counts(params: dict) -> dict[str, int]:
    counts: dict[str, int] = {}
    for key in params:
        counts[key[0]] = counts.get(key[0], 0) + 1
    return counts


def test_per_slot_scaling_is_an_option(tmp_path: Path, micro_world) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    models = [str(micro_world.model("lang")), str(micro_world.model("math"))]
    run_dir = tmp_path / "per_slot"
    evolve(parse_evolve_config(dfs_data(models, trials=2, scaling="per_slot")), run_dir, report=False)
    trials = completed(run_dir)
    m = layer_total(models)
    assert len(trials) == 2 and all(gene_counts(p) == {"I": m * 2, "S": m * 2} for _, p in trials.values())
    hops = json.loads((run_dir / "best_path.json").read_text())["path"]
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    assert model.config.path == hops and hops[-1][2] == 1.0  # per slot, the fixed last hop keeps scale 1


def test_ps_then_dfs_takes_a_ps_run_as_a_source(tmp_path: Path, micro_world) -> None:  # type: ignore[no-untyped-def]
    ps = parse_evolve_config({
        "base_model": str(micro_world.model("base")),
        "models": [str(micro_world.model("lang")), str(micro_world.model("math"))],
        "fitness": {"task": "math_b", "split": "fitness", "limit": LIMIT},
        "report": {"tasks": ["math_b"], "split": "test", "limit": LIMIT},
        "search": {"sampler": "random", "trials": 2},
        "batch_size": 16,
    })
    evolve(ps, tmp_path / "ps", report=False)
    dfs = parse_evolve_config(dfs_data([str(tmp_path / "ps"), str(micro_world.model("math"))], trials=2))
    result = evolve(dfs, tmp_path / "psdfs", report=False)
    sources = json.loads((tmp_path / "psdfs" / "best_path.json").read_text())["sources"]
    assert sources[0] == str(tmp_path / "ps" / "model")
    assert result.trials == 2


def test_dfs_config_errors() -> None:
    with pytest.raises(ConfigError, match="no base_model"):
        parse_evolve_config(dfs_data(["a", "b"], 2) | {"base_model": "a"})
    with pytest.raises(ConfigError, match="scaling"):
        parse_evolve_config(dfs_data(["a", "b"], 2) | {"dfs": {"scaling": "diagonal"}})


def test_report_rows_name_a_run_by_its_folder_and_keep_names_distinct() -> None:
    from shoal.evolve.evaluators import source_labels

    assert source_labels(["/runs/cross/model", "/zoo/small-seed0-v1/math"]) == ["cross (run)", "math"]
    assert source_labels(["/w0/math", "/w1/math", "/w1/lang"]) == ["w0/math", "w1/math", "lang"]
