"""Progress: stage lines when stderr is not a terminal, one bar per stage run on a terminal."""

from __future__ import annotations

import io
import re

import click
from click.testing import CliRunner
from rich.console import Console

import shoal.cli._progress as progress_module
from shoal.cli._progress import StageLines, progress_bars


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def strip_time(lines: list[str]) -> list[str]:
    return [re.sub(r"^\d\d:\d\d:\d\d ", "", line) for line in lines]


def test_stage_lines_start_end_and_restart():
    lines: list[str] = []
    clock = FakeClock()
    report = StageLines(lines.append, clock)
    for done in range(4):
        report("main search", done, 3)
        clock.now += 10
    report("main search", 3, 3)  # a repeated final report writes nothing
    report("control search", 0, 2)  # a new stage, then the first one again from 0: a new run
    report("main search", 0, 3)
    clock.now += 75
    report.close()
    assert strip_time(lines) == [
        "main search: started (3 steps)",
        "main search: done 3/3 in 30.0 s",
        "control search: started (2 steps)",
        "main search: started (3 steps)",
        "control search: stopped at 0/2 in 1 min 15 s",
        "main search: stopped at 0/3 in 1 min 15 s",
    ]


def test_stage_without_total_ends_when_closed():
    lines: list[str] = []
    clock = FakeClock()
    report = StageLines(lines.append, clock)
    report("download", 1, None)
    clock.now += 2
    report("download", 5, None)
    report.close()
    assert strip_time(lines) == ["download: started", "download: done 5 in 2.0 s"]


def test_off_a_terminal_the_cli_writes_stage_lines_to_stderr():
    @click.command()
    def job() -> None:
        with progress_bars() as report:
            for done in range(1, 4):
                report("grid search", done, 3)
        click.echo("result")

    result = CliRunner().invoke(job, [])
    assert result.stdout == "result\n"
    assert strip_time(result.stderr.splitlines()) == ["grid search: started (3 steps)",
                                                      "grid search: done 3/3 in 0.0 s"]
    with progress_bars(enabled=False) as report:  # --quiet: nothing at all
        report("grid search", 1, 3)


def test_on_a_terminal_each_run_of_a_stage_gets_its_own_bar(monkeypatch):
    screen = io.StringIO()
    monkeypatch.setattr(progress_module, "console", Console(file=screen, force_terminal=True, width=100))
    with progress_bars() as report:
        for done in range(1, 121):
            report("control search", done, 120)
        report("main search", 0, 120)
        report("main search", 0, 120)
        report("main search", 5, 120)
        report("main search", 0, 120)  # the same label from 0 again: a second bar, not a drop to 0
    final = screen.getvalue().split("\x1b[1A\x1b[2K")[-1]  # the last frame drawn
    rows = [re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", line).split() for line in final.splitlines()]
    rows = [row for row in rows if "search" in row]
    assert [(row[0], row[1], row[3]) for row in rows] == [
        ("control", "search", "120/120"), ("main", "search", "5/120"), ("main", "search", "0/120")]
