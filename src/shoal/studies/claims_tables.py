"""The claims benchmark's statistics and tables: paired differences over the same test problems.

Every row of a world is scored on the same test problems, so a claim "A > B" is judged on the
per-problem differences ``d_i = a_i - b_i``: their mean, and the standard error of that mean,
``stdev(d) / sqrt(n)`` with the ``n - 1`` sample deviation. The mean over seeds carries the SE
``sqrt(sum se_s^2) / S`` (the seeds' worlds and test splits are independent).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from shoal.errors import ConfigError
from shoal.eval.scoring import mean_stderr


@dataclass(frozen=True)
class Claim:
    """``better`` beats ``baseline`` (row names of a seed's score table)."""

    name: str
    title: str
    better: str
    baseline: str
    at_least: bool = False  # "≥" claims (PS+DFS ≥ PS): holding means not losing by 2 SE


@dataclass(frozen=True)
class Difference:
    seed: int
    better: float  # mean score of the better row, in points
    baseline: float
    diff: float  # points
    se: float  # points
    n: int

    @property
    def z(self) -> float:
        return self.diff / self.se if self.se > 0 else (math.inf if self.diff > 0 else 0.0)


def paired_difference(better: Sequence[float], baseline: Sequence[float]) -> tuple[float, float]:
    """Mean of ``better - baseline`` per problem and the SE of that mean (n - 1), as fractions."""
    if len(better) != len(baseline):
        raise ConfigError(f"paired scores differ in length ({len(better)} vs {len(baseline)}); "
                          "both rows must be scored on the same problems")
    n = len(better)
    if n < 2:
        raise ConfigError("a paired difference needs at least two problems")
    diffs = [a - b for a, b in zip(better, baseline)]
    return sum(diffs) / n, mean_stderr(diffs)


def claim_table(claim: Claim, seeds: Mapping[int, Mapping[str, Sequence[float]]]) -> list[Difference]:
    """One :class:`Difference` per seed whose table holds both rows of ``claim``."""
    rows = []
    for seed in sorted(seeds):
        table = seeds[seed]
        if claim.better not in table or claim.baseline not in table:
            continue
        a, b = table[claim.better], table[claim.baseline]
        diff, se = paired_difference(a, b)
        rows.append(Difference(seed=seed, better=100 * sum(a) / len(a), baseline=100 * sum(b) / len(b),
                               diff=100 * diff, se=100 * se, n=len(a)))
    return rows


def holds(claim: Claim, row: Difference) -> bool:
    """The claim holds on a seed: a gain of at least 2 SE, and a gain (two identical rows, SE 0, are
    no gain); for "≥": no loss of 2 SE or more."""
    if claim.at_least:
        return row.diff >= 0 or row.diff > -2 * row.se
    return row.diff > 0 and row.diff >= 2 * row.se


def mean_over_seeds(rows: Sequence[Difference]) -> tuple[float, float]:
    k = len(rows)
    return sum(r.diff for r in rows) / k, math.sqrt(sum(r.se ** 2 for r in rows)) / k


def claim_markdown(claim: Claim, rows: Sequence[Difference], labels: Mapping[int, Mapping[str, str]]) -> str:
    """A claim's table: per seed the two scores, the difference ± SE, z and whether it holds."""
    lines = [f"**{claim.title}** (`{claim.better}` − `{claim.baseline}`, test, points)", "",
             "| seed | better | baseline | difference ± SE | z | holds (2 SE) |",
             "|---:|---:|---:|---:|---:|:---:|"]
    for r in rows:
        base_label = labels.get(r.seed, {}).get(claim.baseline, "")
        note = f" ({base_label})" if base_label else ""
        lines.append(f"| {r.seed} | {r.better:.1f} | {r.baseline:.1f}{note} | {r.diff:+.1f} ± {r.se:.1f} | "
                     f"{r.z:+.1f} | {'yes' if holds(claim, r) else 'no'} |")
    if rows:
        mean, se = mean_over_seeds(rows)
        lines.append(f"| mean | {sum(r.better for r in rows) / len(rows):.1f} | "
                     f"{sum(r.baseline for r in rows) / len(rows):.1f} | {mean:+.1f} ± {se:.1f} | "
                     f"{mean / se if se else 0.0:+.1f} | |")
    return "\n".join(lines)


def raw_markdown(seeds: Mapping[int, Mapping[str, Sequence[float]]],
                 labels: Mapping[int, Mapping[str, str]]) -> str:
    """Every row's test score per seed (points, binomial SE), with what the row was on that seed."""
    names: list[str] = []
    for table in seeds.values():
        names.extend(n for n in table if n not in names)
    order = sorted(seeds)
    lines = ["| row | " + " | ".join(f"seed {s}" for s in order) + " |",
             "|---|" + "---:|" * len(order)]
    for name in names:
        cells = []
        for s in order:
            scores = seeds[s].get(name)
            if scores is None:
                cells.append("–")
                continue
            p = sum(scores) / len(scores)
            se = mean_stderr(scores)  # the one standard error shoal reports (n - 1, as lm-eval)
            note = labels.get(s, {}).get(name, "")
            cells.append(f"{100 * p:.1f} ± {100 * se:.1f}" + (f" ({note})" if note else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def searches_markdown(searches: Mapping[int, Mapping[str, Mapping]], test: Mapping[int, Mapping[str, float]]) -> str:
    """Per search and seed: the chosen candidate's fitness / validation / test score (points),
    which shows how much of a fitness gain survives on held-out problems."""
    names: list[str] = []
    for table in searches.values():
        names.extend(n for n in table if n not in names)
    order = sorted(searches)
    lines = ["| search (fitness / validation / test) | " + " | ".join(f"seed {s}" for s in order) + " |",
             "|---|" + "---:|" * len(order)]
    for name in names:
        cells = []
        for s in order:
            found = searches[s].get(name)
            if found is None:
                cells.append("–")
                continue
            fit, val = found.get("fitness"), found.get("validation")  # older files lack them
            parts = ["–" if fit is None else f"{100 * fit:.1f}", "–" if val is None else f"{100 * val:.1f}",
                     f"{100 * test[s][name]:.1f}" if name in test.get(s, {}) else "–"]
            cells.append(" / ".join(parts))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
