"""Shared by the kill -9 / --resume tests of staged searches (imported as ``from run_kill import ...``):
trial states read straight from a run's SQLite study, and a kill at the moment a condition holds."""

from __future__ import annotations

import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Callable


def study_states(db: Path) -> dict[str, list[str]]:
    """Trial states per study name, in trial order, read without Optuna (opening a storage races
    the run creating it)."""
    if not db.exists():
        return {}
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as connection:
            rows = connection.execute("SELECT s.study_name, t.state FROM trials t JOIN studies s "
                                      "ON t.study_id = s.study_id ORDER BY t.number").fetchall()
    except sqlite3.Error:
        return {}
    out: dict[str, list[str]] = {}
    for name, state in rows:
        out.setdefault(name, []).append(state)
    return out


def two_stage_states(db: Path, suffix: str, first: str, second: str) -> dict[str, list[str]]:
    """``{first: states of the study whose name ends with suffix, second: the run's own study}``."""
    by_study = study_states(db)
    return {first: [s for name, states in by_study.items() if name.endswith(suffix) for s in states],
            second: [s for name, states in by_study.items() if not name.endswith(suffix) for s in states]}


def kill_when(process: subprocess.Popen, ready: Callable[[], bool], what: str, *, timeout: float = 300,
              poll: float = 0.05) -> None:
    """SIGKILL ``process`` as soon as ``ready()`` holds; fail if it exits first or ``what`` does not
    happen within ``timeout`` seconds."""
    try:
        deadline = time.time() + timeout
        while not ready():
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            assert time.time() < deadline, f"{what} did not happen in {timeout:.0f} s"
            time.sleep(poll)
        process.kill()
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


class RecordingFitness:
    """A fitness over genomes that records what it was asked, in order, and raises
    KeyboardInterrupt (a kill) once it has answered ``stop_after`` genomes. Subclasses give
    ``score(genome) -> float``."""

    def __init__(self, stop_after: int | None = None):
        self.seen: list[dict[str, float]] = []
        self.stop_after = stop_after

    def score(self, genome: dict[str, float]) -> float:
        raise NotImplementedError

    def __call__(self, genome: dict[str, float]) -> tuple[float, dict]:
        if self.stop_after is not None and len(self.seen) >= self.stop_after:
            raise KeyboardInterrupt
        value = self.score(genome)
        self.seen.append(dict(genome))
        return value, {}
