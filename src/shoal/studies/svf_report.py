"""The adapt study report: Markdown tables (for the README), one HTML page and a PNG plot."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any


def _f(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def alpha_by_expert(labels: dict[str, str], alpha: list) -> str:
    """``math_a expert (many) +1.01, ...``: each few-shot weight next to the expert it scales
    (the experts in the study's order: one per skill task, named by its category label). With
    one alpha per matrix (the reference's default), each expert's mean; the JSON has them all."""
    per_matrix = any(isinstance(a, list) for a in alpha)
    means = [sum(a) / len(a) if isinstance(a, list) else a for a in alpha]
    text = ", ".join(f"{task} expert ({label}) {a:+.2f}" for (task, label), a in zip(labels.items(), means))
    return text + (" (means over matrices)" if per_matrix else "")


def markdown_tables(results: dict[str, Any]) -> str:
    """The study's results as Markdown tables."""
    s = results["settings"]
    lines = [f"Settings: objective {s['objective']}, {s['steps']} steps, batch {s['batch_size']}, SVF lr {s['lr']}, "
             f"LoRA rank {s['lora_rank']} lr {s['lora_lr']} objective {s.get('lora_objective', s['objective'])}; "
             f"test limit {s['limit']}.", "",
             "| task | base | SVF | LoRA | SVF params | LoRA params | SVF best step (val) | LoRA best step (val) |",
             "|---|---|---|---|---|---|---|---|"]
    for task, row in results["experts"].items():
        lines.append(f"| {task} | {_f(row['base'])} | {_f(row['svf'])} | {_f(row['lora'])} | "
                     f"{row['svf_parameters']:,} | {row['lora_parameters']:,} | "
                     f"{row['svf_best_step']} ({_f(row['svf_validation'])}) | "
                     f"{row['lora_best_step']} ({_f(row['lora_validation'])}) |")
    clf = results.get("classifier")
    if clf:
        lines += ["", f"Classifier expert: routing accuracy on validation {_f(clf['validation'])} "
                      f"(base {_f(clf['base_validation'])}), best step {clf['best_step']}."]
    strategies = ["base", "prompt", "prompt-generate", "classifier", "few-shot"]
    lines += ["", "Two-pass inference, test score (pass-1 time / pass-2 time):", "",
              "| task | " + " | ".join(strategies) + " |", "|---|" + "---|" * len(strategies)]
    for task, rows in results["two_pass"].items():
        cells = []
        for name in strategies:
            row = rows.get(name)
            cells.append("–" if row is None else
                         f"{_f(row['score'])} ({100 * row['overhead']:.0f}%)" if name != "base" else _f(row["score"]))
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    held = results["two_pass"].get(s["held_out"], {}).get("few-shot")
    if held and held.get("alpha") is not None:
        lines += ["", f"Few-shot alpha on {s['held_out']}: {alpha_by_expert(s['labels'], held['alpha'])}."]
    routes = []
    for task, rows in results["two_pass"].items():
        for name in ("prompt", "prompt-generate", "classifier"):
            if name in rows:
                routes.append(f"{task}/{name}: {json.dumps(rows[name]['categories'])}")
    if routes:
        lines += ["", "Experts chosen in pass 1:", ""] + [f"- {r}" for r in routes]
    transfer = results.get("transfer")
    if transfer:
        lines += ["", f"z transfer to the base of {transfer['world']} (test split of that world; the experts "
                      "above applied unchanged; own SVF: trained on that base with the same settings):", "",
                  "| task | home base | home SVF | other base | transferred SVF | own SVF |",
                  "|---|---|---|---|---|---|"]
        for task, row in transfer["tasks"].items():
            home = results["experts"].get(task, {})
            lines.append(f"| {task} | {_f(home.get('base'))} | {_f(home.get('svf'))} | {_f(row['base'])} | "
                         f"{_f(row['svf_transferred'])} | {_f(row.get('svf_own'))} |")
    return "\n".join(lines) + "\n"


def plot_scores(results: dict[str, Any], path: Path) -> None:
    """Bars: base / SVF / LoRA per skill task, and each strategy on the held-out task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    tasks = list(results["experts"])
    width = 0.27
    for k, key in enumerate(("base", "svf", "lora")):
        left.bar([i + (k - 1) * width for i in range(len(tasks))], [results["experts"][t][key] for t in tasks],
                 width, label=key)
    left.set_xticks(range(len(tasks)), tasks)
    left.set_ylabel("test score")
    left.set_title("experts vs base")
    left.legend(fontsize=8)
    held = results["settings"]["held_out"]
    rows = results["two_pass"].get(held, {})
    right.bar(list(rows), [r["score"] for r in rows.values()], color="tab:gray")
    right.set_title(f"held-out task {held}")
    right.tick_params(axis="x", labelrotation=20)
    for ax in (left, right):
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict[str, Any], out: Path) -> dict[str, Path]:
    """``results.json``, ``report.md``, ``report.html`` and (with matplotlib) ``scores.png`` in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = {"json": out / "results.json", "markdown": out / "report.md", "html": out / "report.html"}
    written["json"].write_text(json.dumps(results, indent=1))
    tables = markdown_tables(results)
    written["markdown"].write_text("# Transformer² study\n\n" + tables)
    image = ""
    try:
        plot_scores(results, out / "scores.png")
        written["png"] = out / "scores.png"
        image = '<img src="scores.png" alt="scores">'
    except ImportError:
        pass
    written["html"].write_text(
        "<!doctype html><meta charset='utf-8'><title>Transformer² study</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}</style>"
        f"<h1>Transformer² study</h1>{image}<pre>{html.escape(tables)}</pre>")
    return written
