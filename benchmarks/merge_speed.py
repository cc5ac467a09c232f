"""Merge speed and memory: ``shoal merge`` against ``mergekit-yaml`` on the same recipe and inputs.

    python benchmarks/make_checkpoints.py --size 0.5b --out /work/bench_data/0.5b
    python benchmarks/merge_speed.py --set /work/bench_data/0.5b --pairs 3 \
        --mergekit /work/mk-venv/bin/mergekit-yaml

Each method's recipe (TIES and DARE-TIES with density 0.5, weights 0.5, normalize on; linear
with weights 0.5; SLERP with t 0.5; the floor is ``passthrough`` of the base: reading one
model and writing it through the same reader and writer) is written once as mergekit YAML,
which both tools read. The tools run alternately (shoal, mergekit, shoal, mergekit, ...) as
separate processes under ``/usr/bin/time -v``; wall time and "Maximum resident set size" are
recorded, and the medians and ratios (mergekit / shoal) printed as a Markdown table.
shoal never imports mergekit: it runs from its own virtual environment.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

METHODS = ("passthrough", "linear", "ties", "dare_ties", "slerp")


def recipe_for(method: str, base: Path, a: Path, b: Path) -> dict:
    """The mergekit-format recipe a method is measured with."""
    if method == "passthrough":
        return {"merge_method": "passthrough", "models": [{"model": str(base)}], "dtype": "bfloat16"}
    if method == "linear":
        return {"merge_method": "linear", "dtype": "bfloat16",
                "models": [{"model": str(a), "parameters": {"weight": 0.5}},
                           {"model": str(b), "parameters": {"weight": 0.5}}]}
    if method == "slerp":
        return {"merge_method": "slerp", "base_model": str(a), "dtype": "bfloat16",
                "models": [{"model": str(a)}, {"model": str(b)}], "parameters": {"t": 0.5}}
    if method in ("ties", "dare_ties"):
        return {"merge_method": method, "base_model": str(base), "dtype": "bfloat16",
                "parameters": {"normalize": True},
                "models": [{"model": str(a), "parameters": {"density": 0.5, "weight": 0.5}},
                           {"model": str(b), "parameters": {"density": 0.5, "weight": 0.5}}]}
    raise ValueError(method)


@dataclass(frozen=True)
class Run:
    tool: str
    method: str
    wall_s: float
    peak_rss_mb: float
    cpu_s: float  # user + system


def timed(command: list[str], *, env: dict[str, str] | None = None) -> tuple[float, float, float]:
    """Run ``command`` under ``/usr/bin/time -v``; (wall seconds, peak RSS in MB, user + system CPU seconds)."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        start = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-v", "-o", report.name, *command],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        wall = time.perf_counter() - start
        text = report.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    if match is None:
        raise RuntimeError(f"no peak RSS in /usr/bin/time output:\n{text}")
    cpu = sum(float(m) for m in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", text))
    return wall, int(match.group(1)) / 1024, cpu


def shoal_command(recipe: Path, out: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "shoal.cli.main", "merge", str(recipe), str(out), "--quiet", *extra]


def mergekit_command(mergekit: str, recipe: Path, out: Path, extra: list[str]) -> list[str]:
    return [mergekit, str(recipe), str(out), *extra]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", type=Path, required=True, help="folder with base/, ft_a/, ft_b/")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--pairs", type=int, default=3, help="runs of each tool per method")
    parser.add_argument("--mergekit", help="path to mergekit-yaml (in its own virtual environment)")
    parser.add_argument("--mergekit-args", default="", help="extra mergekit-yaml arguments")
    parser.add_argument("--shoal-args", default="", help="extra shoal merge arguments")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder for outputs")
    args = parser.parse_args()

    base, a, b = (args.set / n for n in ("base", "ft_a", "ft_b"))
    work = args.work or args.set / "_bench"
    work.mkdir(parents=True, exist_ok=True)
    runs: list[Run] = []
    started = _load()  # a shared machine: the load says how far the seconds can be trusted
    for method in args.methods.split(","):
        recipe = work / f"{method}.yaml"
        recipe.write_text(yaml.safe_dump(recipe_for(method, base, a, b), sort_keys=False))
        tools = [("shoal", shoal_command, args.shoal_args)]
        if args.mergekit:
            tools.append(("mergekit", lambda r, o, e: mergekit_command(args.mergekit, r, o, e),
                          args.mergekit_args))
        for pair in range(args.pairs):
            for tool, make, extra in tools:
                out = work / f"out_{tool}_{method}"
                shutil.rmtree(out, ignore_errors=True)
                wall, rss, cpu = timed(make(recipe, out, extra.split()), env=dict(os.environ))
                shutil.rmtree(out, ignore_errors=True)
                runs.append(Run(tool, method, wall, rss, cpu))
                print(f"{method:12s} {tool:9s} pair {pair + 1}: {wall:7.2f} s  {rss:7.0f} MB  "
                      f"cpu {cpu:7.2f} s  load {_load()}", file=sys.stderr, flush=True)
    print(f"\nload average (1, 5, 15 min) at the start: {started}; at the end: {_load()}")
    print_table(runs, args)


def _load() -> str:
    return " / ".join(f"{value:.2f}" for value in os.getloadavg())


def print_table(runs: list[Run], args: argparse.Namespace) -> None:
    def median(tool: str, method: str, field: str) -> float | None:
        values = [getattr(r, field) for r in runs if r.tool == tool and r.method == method]
        return statistics.median(values) if values else None

    floor = median("shoal", "passthrough", "wall_s")
    print(f"\nset: {args.set}; pairs: {args.pairs}; medians\n")
    print("| method | shoal wall s | shoal CPU s | shoal peak RSS MB | shoal / floor | mergekit wall s | "
          "mergekit CPU s | mergekit peak RSS MB | speed-up (wall) | CPU mergekit/shoal | RSS shoal/mergekit |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        sw, sc, sr = (median("shoal", method, f) for f in ("wall_s", "cpu_s", "peak_rss_mb"))
        mw, mc, mr = (median("mergekit", method, f) for f in ("wall_s", "cpu_s", "peak_rss_mb"))
        cells = [method, f"{sw:.2f}", f"{sc:.1f}", f"{sr:.0f}", f"{sw / floor:.2f}" if floor else "-",
                 f"{mw:.2f}" if mw else "-", f"{mc:.1f}" if mc else "-", f"{mr:.0f}" if mr else "-",
                 f"{mw / sw:.1f}x" if mw else "-", f"{mc / sc:.1f}x" if mc else "-",
                 f"{sr / mr:.2f}" if mr else "-"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
