"""The study runner and its report, at the smallest settings on the micro world."""

from __future__ import annotations

import json

from shoal.studies.svf_report import write_report
from shoal.studies.svf_study import StudySettings, run_study


def test_study_runs_and_writes_its_report(micro_world, tmp_path):
    settings = StudySettings(labels={"sort": "sort", "count": "count"}, steps=2, batch_size=4, eval_every=2,
                             validation_limit=4, limit=4, shots=2, cem_iterations=1, cem_population=2)
    results = run_study(micro_world, tmp_path, settings, transfer_world=micro_world)
    sort = results["experts"]["sort"]
    assert sort["svf_parameters"] == 192 and sort["lora_parameters"] == 2304
    assert all(0.0 <= sort[k] <= 1.0 for k in ("base", "svf", "lora"))
    assert set(results["two_pass"]) == {"sort", "count", "math_b"}
    held = results["two_pass"]["math_b"]
    assert set(held) == {"base", "prompt", "prompt-generate", "classifier", "few-shot"}
    assert len(held["few-shot"]["alpha"]) == 2 and sum(held["classifier"]["categories"].values()) == 4
    # the same base: a "transferred" expert scores what the expert scores at home
    moved = results["transfer"]["tasks"]["sort"]
    assert moved["svf_transferred"] == sort["svf"] and moved["base"] == sort["base"]
    assert moved["svf_own"] == sort["svf"]  # the same settings and seed retrain the same expert
    written = write_report(results, tmp_path / "report")
    assert json.loads(written["json"].read_text()) == json.loads(json.dumps(results))
    table = written["markdown"].read_text()
    assert "objective sft;" in table  # the LoRA baseline's objective is named
    assert f"| sort | {sort['base']:.3f} | {sort['svf']:.3f} | {sort['lora']:.3f} | 192 | 2,304 |" in table
    assert (f"| sort | {sort['base']:.3f} | {sort['svf']:.3f} | {sort['base']:.3f} | {sort['svf']:.3f} | "
            f"{sort['svf']:.3f} |") in table
    alpha = [sum(a) / len(a) if isinstance(a, list) else a for a in held["few-shot"]["alpha"]]
    assert (f"Few-shot alpha on math_b: sort expert (sort) {alpha[0]:+.2f}, count expert (count) {alpha[1]:+.2f}"
            in table) and "<pre>" in written["html"].read_text()


ALL_MATRICES = r"\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.weight$"


def test_study_adapts_the_chosen_matrices(micro_world, tmp_path):
    settings = StudySettings(labels={"sort": "sort"}, steps=1, batch_size=2, eval_every=1, validation_limit=2,
                             limit=2, shots=2, cem_iterations=1, cem_population=2, matrices=[ALL_MATRICES])
    results = run_study(micro_world, tmp_path, settings)
    sort = results["experts"]["sort"]
    assert sort["svf_parameters"] == 448 and sort["lora_parameters"] == 4352  # MLP alone: 192 and 2,304
    assert results["two_pass"]["math_b"]["classifier"]["n"] == 2


def test_study_cli_passes_the_matrices(monkeypatch, micro_world, tmp_path):
    from click.testing import CliRunner

    import shoal.studies.svf_report as report
    import shoal.studies.svf_study as study
    from shoal.cli.main import cli

    seen = {}

    def fake_run(world, out, settings, *, transfer_world=None, resume=False, progress=None):  # type: ignore[no-untyped-def]
        seen["settings"], seen["resume"] = settings, resume
        return {}

    monkeypatch.setattr(study, "run_study", fake_run)
    monkeypatch.setattr(report, "write_report", lambda results, out: {"markdown": tmp_path / "none.md",
                                                                      "html": tmp_path / "none.html"})
    (tmp_path / "none.md").write_text("")
    args = ["svf", "study", "--world", "micro", "--world-root", str(micro_world.root), "--out", str(tmp_path / "s"),
            "--quiet"]
    result = CliRunner().invoke(cli, [*args, "--matrices", ALL_MATRICES, "--matrices", "q_proj"])
    assert result.exit_code == 0, result.output
    assert seen["settings"].matrices == [ALL_MATRICES, "q_proj"]
    assert seen["settings"].lora_objective == "sft" and not seen["resume"]  # the paper's LoRA baseline
    assert seen["settings"].micro_batch_size == 16
    CliRunner().invoke(cli, [*args, "--lora-objective", "reinforce", "--resume", "--micro-batch-size", "64"])
    assert seen["resume"] and seen["settings"].micro_batch_size == 64
    assert seen["settings"].matrices is None and seen["settings"].lora_objective == "reinforce"
    bad = CliRunner().invoke(cli, [*args, "--lora-objective", "ppo"])
    assert bad.exit_code == 64 and "ppo" in bad.output  # a usage error
