"""``shoal demo diffusion`` end to end on the micro drawing world (built into a temporary cache)."""

from __future__ import annotations

import json

import pytest
import yaml

pytest.importorskip("diffusers")


def test_demo_diffusion_writes_every_row_the_grid_and_a_recipe(tmp_path, monkeypatch):
    from click.testing import CliRunner
    from PIL import Image

    from shoal.cli.main import cli
    from shoal.zoo.diffusion_build import load_drawing_world
    from shoal.zoo.diffusion_models import FEW_STEPS, MANY_STEPS

    monkeypatch.setenv("SHOAL_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    result = CliRunner().invoke(cli, ["demo", "diffusion", "--size", "micro", "--out", str(out),
                                      "--evaluations", "4", "--test-copies", "1", "--json",
                                      "--quiet"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    labels = [r["label"] for r in payload["rows"]]
    assert labels[:5] == ["base", "base", "lang (B specialist)",
                          f"fast ({FEW_STEPS}-step specialist)", "uniform merge (weight 1)"]
    assert labels[5].startswith("uniform search") and labels[6] == "evolved (per block)"
    assert [r["steps"] for r in payload["rows"]][:2] == [MANY_STEPS, FEW_STEPS]
    world = load_drawing_world("micro", 0)
    assert world is not None  # the demo built the world into the cache it was given
    test_n = len(world.task("test", "b").prompts)
    assert all(r["n"] == test_n and 0 <= r["accuracy"] <= 1 and r["stderr"] >= 0
               for r in payload["rows"])
    grid = Image.open(out / "grid.png")
    assert grid.size[1] > 8 * 32 * 3 and grid.size[0] > 8 * 32 * 3  # 8 rows, 8 prompts, 3x
    recipe = yaml.safe_load((out / "evolved_recipe.yaml").read_text())
    assert recipe["merge_method"] == "task_arithmetic"
    assert recipe["base_model"] == str(world.model("base"))
    trace = json.loads((out / "trace.json").read_text())
    assert len(trace["evolved"]["fitness"]) == 4 and len(trace["uniform"]["fitness"]) == 4
    report = (out / "report.md").read_text()
    assert f"| evolved (per block) | {FEW_STEPS} |" in report and "grid.png" in report
    paired = {(d["baseline"], d["steps"]): d for d in payload["paired"]}  # evolved minus each
    rows = payload["rows"]
    assert list(paired) == [(r["label"], r["steps"]) for r in rows[2:6] + rows[7:]]
    for (label, steps), d in paired.items():
        other = next(r for r in rows if (r["label"], r["steps"]) == (label, steps))
        assert abs(d["difference"] - (rows[6]["accuracy"] - other["accuracy"])) < 1e-9
        assert d["n"] == test_n and d["drawings"] == test_n and d["stderr"] >= 0
    assert "| evolved minus |" in report and "Picks (fitness / validation): evolved " in report
    # the same command again resumes the finished searches (nothing re-searched) and prints the table
    table = CliRunner().invoke(cli, ["demo", "diffusion", "--size", "micro", "--out", str(out),
                                     "--evaluations", "4", "--test-copies", "1", "--quiet"])
    assert table.exit_code == 0 and "| base | 20 |" in table.stdout
    assert json.loads((out / "trace.json").read_text())["evolved"] == trace["evolved"]
    # other settings in the same folder are refused, in one line, and the folder is left as it was
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    other = CliRunner().invoke(cli, ["demo", "diffusion", "--size", "micro", "--out", str(out),
                                     "--evaluations", "2", "--test-copies", "1", "--quiet"])
    assert other.exit_code == 2
    assert "other settings (evaluations: 4 there, 2 now); use a new output folder" in other.output
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    # the coarse genes: one per UNet part and one for the text encoder, per specialist
    parts = CliRunner().invoke(cli, ["demo", "diffusion", "--size", "micro", "--out", str(tmp_path / "parts"),
                                     "--evaluations", "2", "--test-copies", "1", "--genes", "parts",
                                     "--search-seed", "3", "--json", "--quiet"])
    assert parts.exit_code == 0, parts.output
    assert json.loads(parts.stdout)["rows"][6]["label"] == "evolved (per part, 10 genes)"
    assert len(json.loads((tmp_path / "parts" / "trace.json").read_text())["genes"]) == 10
    settings = json.loads((tmp_path / "parts" / "demo_settings.json").read_text())
    assert settings["search_seed"] == 3 and settings["genes"] == "parts"
