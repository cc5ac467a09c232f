"""The run report: PNG plots and one HTML page.

- ``fitness.png``: fitness of every trial and the best so far, in %, with the best source and
  the uniform merge as reference lines and the validation pick marked;
- ``genome.png``: the best genome — a heatmap (models x layer groups, one panel per parameter)
  for parameter space, a drawing of the path (model, layer and scale of each hop) for DFS;
- ``report.html``: both plots, the score table with example counts and standard errors, and
  the best recipe (``zoo:`` names for zoo sources); :func:`add_figure` adds more figures.
"""

from __future__ import annotations

import html
import os
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
                 title: str = "fitness per trial", *, references: Mapping[str, float] | None = None,
                 pick: tuple[int, float] | None = None) -> None:
    """One or more runs' fitness per trial (dots) and best so far (line), in % like the score
    tables; ``references`` are drawn as labelled horizontal lines (the best source, the uniform
    merge), ``pick`` (trial number, fitness) marks the candidate picked on validation."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (numbers, values, best) in curves.items():
        line = ax.plot(numbers, [100 * b for b in best], label=f"{label}: best so far")[0]
        ax.scatter(numbers, [100 * v for v in values], s=8, alpha=0.35, color=line.get_color())
    for (label, value), style in zip((references or {}).items(), ("--", ":", "-.", (0, (5, 1)))):
        ax.axhline(100 * value, linestyle=style, color="0.35", linewidth=1,
                   label=f"{label}: {100 * value:.1f}%")
    if pick is not None:
        ax.scatter([pick[0]], [100 * pick[1]], marker="*", s=160, color="crimson", zorder=5,
                   label=f"validation pick (trial {pick[0]})")
    ax.set_xlabel("trial")
    ax.set_ylabel("fitness (% correct)")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def picked_trial(study: Any, genome: Mapping[str, float]) -> tuple[int, float] | None:
    """(number, fitness) of the completed trial whose parameters are ``genome``."""
    import optuna

    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if trial.params == dict(genome):
            return trial.number, float(trial.value)
    return None


def fitness_references(evaluator: Any) -> dict[str, float]:
    """The fitness (the search's own tasks, split and limit) of the best source and, in
    parameter space, of the uniform merge: the lines a search has to clear."""
    spec = evaluator.config.fitness
    rows = [(label, row) for label, row in evaluator.rows({}, None)]
    scored = [(label, evaluator.score_row(row, spec.task, spec.split, spec.limit).score) for label, row in rows]
    sources = [(label, value) for (label, row), (_, value) in zip(rows, scored) if isinstance(row, str)]
    references: dict[str, float] = {}
    if sources:
        label, value = max(sources, key=lambda item: item[1])
        references[f"best source ({label})"] = value
    references.update({label: value for (label, row), (_, value) in zip(rows, scored) if not isinstance(row, str)})
    return references


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
    lines = ["| model | " + " | ".join(f"{t} ({split})" for t in tasks) + " |",
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


def recipe_text(evaluator: Any, genome: Mapping[str, float]) -> str:
    """The best recipe (``zoo:`` names for zoo sources) or the best path, as the report shows it."""
    space = getattr(evaluator, "space", None)
    if hasattr(space, "genes"):
        from shoal.evolve.study_attrs import portable_recipe

        return portable_recipe(space.decode(genome)).to_yaml()
    return evaluator.describe(genome)


def write_report(run_dir: Path, study: Any, evaluator: Any, genome: Mapping[str, float],
                 scores: Sequence[Any], *, extra_curves: Mapping[str, Any] | None = None,
                 references: Mapping[str, float] | None = None) -> Path:
    """``fitness.png``, ``genome.png`` and ``report.html`` in ``run_dir``.

    ``references`` (label -> fitness) are the fitness plot's reference lines; by default the
    best source and the uniform merge are scored on the fitness split for them."""
    curves = {"this run": trial_curve(study)}
    curves.update(extra_curves or {})
    if references is None:
        references = fitness_references(evaluator)
    pick = picked_trial(study, genome)
    spec = evaluator.config.fitness
    plot_fitness(curves, run_dir / "fitness.png", title=f"{'+'.join(spec.tasks)} ({spec.split} split) per trial",
                 references=references, pick=pick)
    evaluator.plot_best(genome, run_dir / "genome.png")
    tasks, rows = score_table(scores)
    head = "".join(f"<th>{html.escape(t)}</th>" for t in tasks)
    body = "".join("<tr><td>" + html.escape(m) + "</td>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells)
                   + "</tr>" for m, cells in rows)
    recipe = recipe_text(evaluator, genome)
    picked = (f" The validation pick is trial {pick[0]} (fitness {100 * pick[1]:.1f}%, the star in the "
              "plot).") if pick else ""
    lines = "".join(f"<li>{html.escape(label)}: {100 * value:.1f}%</li>" for label, value in references.items())
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>shoal evolve report</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px}}
pre{{background:#f6f6f6;padding:1em;overflow:auto;max-height:30em}}</style></head><body>
<h1>Evolutionary merge: {html.escape(evaluator.title)}</h1>
<p>{len(trial_curve(study)[0])} completed trials.
Test scores are reported only; the search optimized the fitness split and the final candidate
was picked on the validation split.{picked}</p>
<h2>Scores ({html.escape(scores[0].split if scores else 'test')} split, % correct ± standard error)</h2>
<table><tr><th>model</th>{head}</tr>{body}</table>
<h2>Fitness</h2><img src="fitness.png" alt="fitness per trial">
<p>Reference lines (fitness split):</p><ul>{lines}</ul>
<h2>Best candidate</h2><img src="genome.png" alt="best genome">
<h2>Best recipe / path</h2><pre>{html.escape(recipe)}</pre>
<!-- figures -->
</body></html>
"""
    path = run_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def add_figure(report: Path, image: Path, caption: str) -> None:
    """Add a figure (``image``, linked relative to the page) with its caption to a written
    report page, e.g. the demo's ``fitness_runs.png`` (evolved vs control) on the evolved run's."""
    report = Path(report)
    try:
        src = os.path.relpath(Path(image).resolve(), report.resolve().parent)
    except ValueError:  # another drive (Windows): an absolute link still works
        src = str(Path(image).resolve())
    figure = (f'<h2>{html.escape(caption)}</h2><a href="{html.escape(src)}">'
              f'<img src="{html.escape(src)}" alt="{html.escape(caption)}"></a>\n<!-- figures -->')
    page = report.read_text(encoding="utf-8")
    report.write_text(page.replace("<!-- figures -->", figure, 1), encoding="utf-8")
