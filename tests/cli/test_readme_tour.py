"""The README's tour runs as written: the Transformer² commands, through the CLI, on the micro
world (small budgets added), and every example file the tour names exists."""

from __future__ import annotations

import glob
import json
import re
import shlex
from pathlib import Path

from click.testing import CliRunner

from shoal.adapt import load_expert
from shoal.cli.main import cli

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
BUDGET = {
    ("svf", "train"): ["--steps", "2", "--batch-size", "4", "--eval-every", "2", "--validation-limit", "4"],
    ("svf", "train-classifier"): ["--steps", "2", "--batch-size", "4", "--eval-every", "2",
                                  "--validation-limit", "4", "--per-task", "8"],
    ("adapt",): ["--limit", "4", "--shots", "2", "--cem-iterations", "1", "--cem-population", "2"],
}


def tour_section(title: str) -> str:
    text = README.read_text()
    start = text.index(title)
    end = text.find("\n### ", start + 1)
    return text[start:end]


def bash_commands(section: str) -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [shlex.split(line, comments=True) for block in blocks for line in block.splitlines() if line.strip()]


def test_transformer2_tour_runs_as_written(micro_world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    commands = bash_commands(tour_section("### `shoal svf` and `shoal adapt`"))
    assert [c[:3] for c in commands][:3] == [["shoal", "svf", "train"]] * 2 + [["shoal", "svf", "train-classifier"]]
    strategies = []
    for words in commands:
        assert words[0] == "shoal"
        args = []
        for word in words[1:]:
            word = word.replace("zoo:small/base", str(micro_world.model("base")))
            args += sorted(glob.glob(word)) if "*" in word else [word]
        key = tuple(words[1:3]) if words[1] == "svf" else (words[1],)
        result = CliRunner().invoke(cli, [*args, *BUDGET[key], "--svd-cache", str(tmp_path / "svd"), "-q"])
        assert result.exit_code == 0, (words, result.output)
        if words[1] == "adapt":
            strategy = args[args.index("--strategy") + 1] if "--strategy" in args else "prompt"
            strategies.append(strategy)
            assert f"math_b [test] {strategy}: " in result.stdout and "(n=4)" in result.stdout
            if strategy == "few-shot":  # each alpha next to its expert's name
                assert re.search(r"alpha lang_b [+-]\d\.\d\d, math_a [+-]\d\.\d\d", result.stdout), result.stdout
    assert strategies == ["prompt", "classifier", "few-shot"]
    assert sorted(p.name for p in (tmp_path / "experts").iterdir() if p.suffix == ".safetensors") == [
        "lang_b.safetensors", "math_a.safetensors"]
    # the classifier answers with the choice numbers pass 1 reads (the zoo cannot tell the names apart)
    again = CliRunner().invoke(cli, ["svf", "train-classifier", str(micro_world.model("base")), "--experts",
                                     "experts/math_a.safetensors", "experts/lang_b.safetensors", "--out", "c2.safetensors",
                                     "--steps", "1", "--per-task", "4", "--validation-limit", "4", "--json", "-q",
                                     "--svd-cache", str(tmp_path / "svd")])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["answers"] == {"lang_b": "1", "math_a": "2", "other": "3"}
    assert load_expert(tmp_path / "c2.safetensors").meta.label == "router"


def test_the_tour_names_only_files_that_exist():
    section = README.read_text()[README.read_text().index("## A short tour"):]
    named = set(re.findall(r"examples/[\w.-]+\.yaml", section))
    assert "examples/ties_gradient.yaml" in named and "examples/evolve_cross.yaml" in named
    assert all((ROOT / path).is_file() for path in named), sorted(p for p in named if not (ROOT / p).is_file())
    commands = bash_commands(section)
    assert not [c for c in commands if "recipe.yaml" in c or "MODEL" in c or "PATH" in c]
