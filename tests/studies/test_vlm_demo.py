"""``shoal demo vlm``: its table, picture grid and CLI (the real run: test_vlm_demo_run.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

import shoal.studies.evolve_demo as evolve_demo
import shoal.studies.vlm_demo as vlm_demo
from shoal.cli.main import cli
from shoal.eval.evaluate import result_from_scores
from shoal.studies.vlm_demo import DemoRow, VlmDemoResult, markdown_rows, row_of
from shoal.studies.vlm_pictures import picture_grid
from shoal.zoo import get_image_task


def test_rows_give_rouge_and_exact_match_with_standard_errors() -> None:
    scores = [1.0, 0.5, 1.0, 0.0, 1 / 3]
    row = row_of("m", result_from_scores("vqa_b", "test", ["x"] * 5, scores))
    assert row.n == 5 and row.rouge_l == pytest.approx(sum(scores) / 5)
    assert row.exact == pytest.approx(0.4)
    assert row.exact_stderr == pytest.approx(math.sqrt(0.4 * 0.6 / 4))
    table = markdown_rows([row])
    assert "| m | 56.7 ± " in table and "| 40.0 ± 24.5 | 5 |" in table


def test_picture_grid_draws_every_answer(tmp_path: Path) -> None:
    from PIL import Image

    examples = list(get_image_task("vqa_b").examples("test")[:3])
    answers = {"VLM": ["1 a", "", examples[2].target], "evolved": [e.target for e in examples]}
    path = picture_grid(examples, answers, tmp_path / "grid.png", title="t")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > image.height
    with pytest.raises(ValueError, match="VLM: 1 answers for 3 pictures"):
        picture_grid(examples, {"VLM": ["x"]}, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_cli_demo_vlm_runs_the_vlm_demo_and_plain_demo_the_llm_one(tmp_path: Path, monkeypatch) -> None:
    seen = {}
    rows = (DemoRow("evolved", 0.8, 0.01, 0.6, 0.02, 500), DemoRow("VLM", 0.3, 0.01, 0.1, 0.01, 500))

    def fake_vlm_demo(**kwargs):  # type: ignore[no-untyped-def]
        seen.update(kwargs)
        kwargs["progress"]("main search", 1, 1)
        return VlmDemoResult(out=kwargs["out"], rows=rows, pictures=kwargs["out"] / "pictures.png",
                             evolved_recipe=kwargs["out"] / "evolved" / "best_recipe.yaml",
                             model=kwargs["out"] / "evolved" / "model")

    def no_llm_demo(**kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the LLM demo ran")

    monkeypatch.setattr(vlm_demo, "run_vlm_demo", fake_vlm_demo)
    monkeypatch.setattr(evolve_demo, "run_demo", no_llm_demo)
    result = CliRunner().invoke(cli, ["demo", "vlm", "--size", "micro", "--trials", "4", "--json", "-q"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["rows"][0] == {"model": "evolved", "rouge_l": 0.8, "rouge_l_stderr": 0.01, "exact": 0.6,
                               "exact_stderr": 0.02, "n": 500}
    assert seen["out"] == Path("runs/demo-vlm") and seen["trials"] == 4 and seen["size"] == "micro"
    table = CliRunner().invoke(cli, ["demo", "vlm", "--size", "micro", "--out", str(tmp_path)])
    assert table.exit_code == 0 and "| evolved | 80.0 ± 1.0 | 60.0 ± 2.0 | 500 |" in table.stdout
    assert seen["out"] == tmp_path
    plain = CliRunner().invoke(cli, ["demo", "--size", "micro", "--out", str(tmp_path), "-q"])
    assert plain.exit_code != 0 and "the LLM demo ran" in str(plain.exception)
    bad = CliRunner().invoke(cli, ["demo", "vlmx"])
    assert bad.exit_code == 64 and "No such command 'vlmx'" in bad.output  # a usage error


def test_paired_differences_pair_the_same_examples() -> None:
    from shoal.studies.vlm_demo import markdown_differences, paired_differences

    scores = {"VLM": [1.0, 0.5, 0.0, 1.0], "control": [1.0, 1.0, 1.0, 1.0],
              "evolved": [1.0, 1.0, 0.5, 1.0]}
    vlm, control = paired_differences(scores, "evolved")
    assert (vlm.baseline, control.baseline) == ("VLM", "control") and vlm.n == 4
    # exact match per example: evolved 1,1,0,1; VLM 1,0,0,1 -> differences 0,1,0,0
    assert vlm.exact == pytest.approx(0.25) and vlm.exact_stderr == pytest.approx(0.25)
    assert vlm.rouge_l == pytest.approx(0.25) and vlm.z == pytest.approx(1.0)
    assert control.exact == pytest.approx(-0.25) and control.rouge_l == pytest.approx(-0.125)
    same = paired_differences({"a": [1.0, 0.0], "evolved": [1.0, 0.0]}, "evolved")[0]
    assert (same.exact, same.exact_stderr, same.z) == (0.0, 0.0, 0.0)
    table = markdown_differences([vlm])
    assert "| VLM | +25.0 ± 25.0 | +1.0 | +25.0 ± " in table
    with pytest.raises(Exception, match="differ in length"):
        paired_differences({"a": [1.0], "evolved": [1.0, 0.0]}, "evolved")
