"""The run report: PNG plots and one HTML page.

- ``fitness.png``: fitness of every trial and the best so far;
- ``genome.png``: the best genome — a heatmap (models x layer groups, one panel per parameter)
  for parameter space, a drawing of the path (model, layer and scale of each hop) for DFS;
- ``report.html``: both plots, the score table with example counts and standard errors, and
  the best recipe.
"""

from __future__ import annotations

import html
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Sequence

from shoal.evolve.space import GLOBAL, SearchSpace


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def trial_curve(study: Any) -> tuple[list[int], list[float], list[float]]:
    """Trial numbers, fitness values and best-so-far of the completed trials."""
    import optuna

    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    done.sort(key=lambda t: t.number)
    numbers = [t.number for t in done]
    values = [float(t.value) for t in done]
    best, running = [], float("-inf")
    for value in values:
        running = max(running, value)
        best.append(running)
    return numbers, values, best


def plot_fitness(curves: Mapping[str, tuple[list[int], list[float], list[float]]], path: Path,
                 title: str = "fitness per trial") -> None:
    """One or more runs' fitness per trial (dots) and best so far (line)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (numbers, values, best) in curves.items():
        line = ax.plot(numbers, best, label=f"{label}: best so far")[0]
        ax.scatter(numbers, values, s=8, alpha=0.35, color=line.get_color())
    ax.set_xlabel("trial")
    ax.set_ylabel("fitness")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_genome(space: SearchSpace, genome: Mapping[str, float], path: Path) -> None:
    """Heatmap of parameter values: rows are models, columns are cells, one panel per parameter."""
    plt = _pyplot()
    values = space.values(genome)
    params = list(dict.fromkeys(g.param for g in space.genes))
    cells = list(dict.fromkeys(g.cell for g in space.genes))
    fig, axes = plt.subplots(len(params), 1, figsize=(max(6, 0.7 * len(cells) + 2), 1.6 + 1.3 * len(params)
                                                      * max(1, len(space.models)) / 2), squeeze=False)
    for ax, param in zip(axes[:, 0], params):
        genes = [g for g in space.genes if g.param == param]
        owners = list(dict.fromkeys(g.model for g in genes))
        grid = [[float("nan")] * len(cells) for _ in owners]
        for gene in genes:
            grid[owners.index(gene.model)][cells.index(gene.cell)] = values[gene.key]
        low, high = genes[0].low, genes[0].high
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=low, vmax=high)
        ax.set_yticks(range(len(owners)), [("all models" if o == GLOBAL else Path(o).name) for o in owners])
        ax.set_xticks(range(len(cells)), [c.group + (f"\n{c.module}" if c.module else "") for c in cells],
                      fontsize=7, rotation=45, ha="right")
        for r, row in enumerate(grid):
            for c, value in enumerate(row):
                ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white")
        ax.set_title(param)
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def score_table(scores: Sequence[Any]) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """Tasks (columns) and rows of 'score ± stderr (n)' per model."""
    tasks = list(dict.fromkeys(s.task for s in scores))
    by_model: dict[str, dict[str, Any]] = defaultdict(dict)
    for s in scores:
        by_model[s.model][s.task] = s
    rows = []
    for model, cells in by_model.items():
        rows.append((model, [f"{100 * cells[t].score:.1f} ± {100 * cells[t].stderr:.1f} (n={cells[t].n})"
                             if t in cells else "" for t in tasks]))
    return tasks, rows


def markdown_table(scores: Sequence[Any]) -> str:
    tasks, rows = score_table(scores)
    split = scores[0].split if scores else "test"
    lines = [f"| model | " + " | ".join(f"{t} ({split})" for t in tasks) + " |",
             "|---|" + "---|" * len(tasks)]
    lines += [f"| {m} | " + " | ".join(cells) + " |" for m, cells in rows]
    return "\n".join(lines)


def plot_path(path: Any, names: Sequence[str], out: Path) -> None:
    """The best layer path: one box per hop, coloured by source model, labelled with the layer
    and the scale applied to its input."""
    plt = _pyplot()
    hops = list(path)
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(hops) + 1.5), 2.4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, hop in enumerate(hops):
        color = colors[hop.model % len(colors)]
        ax.add_patch(plt.Rectangle((i, 0), 0.9, 1, color=color, alpha=0.85))
        ax.text(i + 0.45, 0.62, f"L{hop.layer}", ha="center", va="center", fontsize=8, color="white")
        ax.text(i + 0.45, 0.3, f"×{hop.scale:.2f}", ha="center", va="center", fontsize=7, color="white")
    for model, name in enumerate(names):
        ax.plot([], [], "s", color=colors[model % len(colors)], label=name)
    ax.set_xlim(-0.1, len(hops))
    ax.set_ylim(0, 1.1)
    ax.set_yticks([])
    ax.set_xlabel("hop (input scale shown under each layer)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=max(1, len(names)), fontsize=8)
    ax.set_title(f"best layer path: {len(hops)} hops")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def write_report(run_dir: Path, study: Any, evaluator: Any, genome: Mapping[str, float],
                 scores: Sequence[Any], *, extra_curves: Mapping[str, Any] | None = None) -> Path:
    curves = {"this run": trial_curve(study)}
    curves.update(extra_curves or {})
    plot_fitness(curves, run_dir / "fitness.png")
    evaluator.plot_best(genome, run_dir / "genome.png")
    tasks, rows = score_table(scores)
    head = "".join(f"<th>{html.escape(t)}</th>" for t in tasks)
    body = "".join("<tr><td>" + html.escape(m) + "</td>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells)
                   + "</tr>" for m, cells in rows)
    recipe = evaluator.describe(genome)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>shoal evolve report</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px}}
pre{{background:#f6f6f6;padding:1em;overflow:auto;max-height:30em}}</style></head><body>
<h1>Evolutionary merge: {html.escape(evaluator.title)}</h1>
<p>{len(trial_curve(study)[0])} completed trials.
Test scores are reported only; the search optimized the fitness split and the final candidate
was picked on the validation split.</p>
<h2>Scores ({html.escape(scores[0].split if scores else 'test')} split)</h2>
<table><tr><th>model</th>{head}</tr>{body}</table>
<h2>Fitness</h2><img src="fitness.png" alt="fitness per trial">
<h2>Best candidate</h2><img src="genome.png" alt="best genome">
<h2>Best recipe / path</h2><pre>{html.escape(recipe)}</pre>
</body></html>
"""
    path = run_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
