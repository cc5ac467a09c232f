"""What every command shares: -q/-v, exit codes, shell completion, hub options, unwrapped tables."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from shoal.cli.main import EXIT_BAD_DATA, EXIT_USAGE, cli
from shoal.errors import CheckpointError

README = Path(__file__).resolve().parents[2] / "README.md"
# commands whose modules other helpers own; the lead applies the same two decorators there
PENDING_VERBOSITY: set[str] = set()
# Commands that hand every argument to another tool unchanged (lm-eval has its own --verbosity).
PASS_THROUGH = {"lm-eval"}


def leaf_commands(group: click.Group = cli, prefix: str = "") -> dict[str, click.Command]:
    found: dict[str, click.Command] = {}
    for name, command in group.commands.items():
        path = f"{prefix}{name}"
        if isinstance(command, click.Group):
            if command.invoke_without_command:  # a group that runs by itself (shoal demo)
                found[path] = command
            found.update(leaf_commands(command, path + " "))
        else:
            found[path] = command
    return found


def test_every_command_has_quiet_and_verbose():
    commands = leaf_commands()
    assert {"demo", "eval", "adapt", "methods", "zoo build", "zoo card", "svf train", "svf train-classifier",
            "svf study"} <= set(commands)
    missing = []
    for path, command in commands.items():
        flags = {opt for param in command.params for opt in param.opts}
        if not {"-q", "--quiet", "-v", "--verbose"} <= flags and path not in PENDING_VERBOSITY | PASS_THROUGH:
            missing.append(path)
    assert not missing, f"commands without -q/-v: {missing}"


def test_verbose_sends_the_shoal_logger_to_stderr(monkeypatch):
    import shoal.merge.registry as registry

    def logging_methods():  # type: ignore[no-untyped-def]
        logging.getLogger("shoal.merge.registry").info("listing the methods")
        logging.getLogger("shoal.merge.registry").debug("debug detail")
        return []

    monkeypatch.setattr(registry, "all_methods", logging_methods)
    plain = CliRunner().invoke(cli, ["methods"])
    assert plain.exit_code == 0 and "listing the methods" not in plain.stderr
    verbose = CliRunner().invoke(cli, ["methods", "-v"])
    assert verbose.exit_code == 0 and "INFO shoal.merge.registry: listing the methods" in verbose.stderr
    assert "debug detail" not in verbose.stderr
    assert "debug detail" in CliRunner().invoke(cli, ["methods", "-vv"]).stderr
    again = CliRunner().invoke(cli, ["methods"])  # -v does not outlive its command
    assert "listing the methods" not in again.stderr and logging.getLogger("shoal").level == logging.NOTSET


@pytest.mark.parametrize("args", [
    ["--no-such-option"],
    ["eval"],  # MODEL and --task missing
    ["eval", "m", "--task", "t", "--batch-size", "0"],
    ["zoo", "build", "--size", "huge"],
    ["zoo", "no-such-command"],
    ["adapt", "m", "--experts", "README.md"],  # neither --task nor --prompt
    ["adapt", "m", "--experts", "README.md", "--strategy", "classifier", "--task", "sort"],  # no --classifier
])
def test_usage_errors_exit_64(args, monkeypatch):
    monkeypatch.chdir(README.parent)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == EXIT_USAGE == 64, result.output
    assert "Traceback" not in result.output


def test_bad_data_exits_2_with_one_line(tmp_path):
    result = CliRunner().invoke(cli, ["eval", str(tmp_path / "missing"), "--task", "sort"])
    assert result.exit_code == EXIT_BAD_DATA == 2
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: ")


def test_readme_documents_exit_codes_and_completion():
    text = README.read_text()
    assert "**Exit codes.**" in text and "64 (`EX_USAGE`)" in text and "2: bad data" in text
    assert "_SHOAL_COMPLETE=bash_source shoal" in text


def test_shell_completion_as_documented():
    script = CliRunner().invoke(cli, [], prog_name="shoal", env={"_SHOAL_COMPLETE": "bash_source"})
    assert script.exit_code == 0 and "_shoal_completion" in script.output and "complete " in script.output
    words = CliRunner().invoke(cli, [], prog_name="shoal", env={
        "_SHOAL_COMPLETE": "bash_complete", "COMP_WORDS": "shoal zoo ca", "COMP_CWORD": "2"})
    assert words.exit_code == 0 and "card" in words.output


def test_revision_and_token_reach_the_hub_loader(monkeypatch, tmp_path):
    import shoal.eval as shoal_eval

    seen = {}

    def fake_load_model(reference, **kwargs):  # type: ignore[no-untyped-def]
        seen.update(kwargs, reference=reference, token=os.environ.get("HF_TOKEN"))
        raise CheckpointError(f"{reference}: offline")

    monkeypatch.setattr(shoal_eval, "load_model", fake_load_model)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    result = CliRunner().invoke(cli, ["eval", "owner/name", "--revision", "v1.0", "--token", "hf_secret",
                                      "--task", "sort", "-q"])
    assert result.exit_code == 2 and "owner/name: offline" in result.stderr
    assert (seen["reference"], seen["revision"], seen["token"]) == ("owner/name", "v1.0", "hf_secret")


def test_revision_of_a_local_model_is_a_usage_error(tmp_path):
    (tmp_path / "model").mkdir()
    result = CliRunner().invoke(cli, ["eval", str(tmp_path / "model"), "--revision", "main", "--task", "sort"])
    assert result.exit_code == 64 and "--revision applies to hub models" in result.output


def test_json_on_demo_and_eval():
    for name in ("demo", "eval", "adapt", "svf train", "zoo card"):
        command = leaf_commands()[name]
        assert "--json" in {opt for param in command.params for opt in param.opts}, name


def test_tables_are_not_cut_when_stdout_is_not_a_terminal():
    from shoal.cli._progress import print_text, stdout

    row = "| " + " | ".join(f"column {i} with a long header" for i in range(8)) + " |"
    table = "\n".join([row, "|---" * 8 + "|", row.replace("column", "[cell]")])

    @click.command()
    def show() -> None:
        print_text(table)
        stdout.print(table)  # the console other commands print tables with

    result = CliRunner().invoke(show, [])
    assert result.exit_code == 0 and len(row) > 200
    assert result.output == table + "\n" + table + "\n"


def test_zoo_card_prints_whole_rows(micro_world):
    result = CliRunner().invoke(cli, ["zoo", "card", "--size", "micro", "--out", str(micro_world.root),
                                      "--limit", "2", "-q"])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if line.startswith("|")]
    assert len(rows) == 2 + len(micro_world.models) and all(line.endswith("|") for line in rows)
    as_json = CliRunner().invoke(cli, ["zoo", "card", "--size", "micro", "--out", str(micro_world.root),
                                       "--limit", "2", "--json"])
    assert set(json.loads(as_json.stdout)["scores"]) == set(micro_world.models)
