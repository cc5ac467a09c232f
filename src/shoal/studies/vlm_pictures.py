"""The VLM demo's picture grid: a few test pictures, the question, and each model's answer."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Mapping, Sequence

from shoal.eval.scoring import rouge_l
from shoal.eval.task import Example
from shoal.zoo.languages import to_a


def picture_grid(examples: Sequence[Example], answers: Mapping[str, Sequence[str]],
                 path: str | Path, *, title: str = "") -> Path:
    """Write a PNG with one column per example: its picture, its prompt (and the prompt read in
    language A, for the reader), the expected answer, and every model's answer (green when
    it matches word for word, red otherwise). ``answers[model][i]`` answers ``examples[i]``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    for name, rows in answers.items():
        if len(rows) != len(examples):
            raise ValueError(f"{name}: {len(rows)} answers for {len(examples)} pictures")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = len(examples)
    lines = 6 + len(answers)
    figure, axes = plt.subplots(2, columns, figsize=(3.1 * columns, 2.6 + 0.32 * lines),
                                gridspec_kw={"height_ratios": [2.2, 0.3 * lines]}, squeeze=False)
    for i, example in enumerate(examples):
        picture, text = axes[0][i], axes[1][i]
        picture.imshow(example.images[0] if example.images else [[0]], interpolation="nearest")
        picture.set_xticks([])
        picture.set_yticks([])
        text.axis("off")
        prompt = example.prompt.replace("<image>", "[picture]")
        rows = [(textwrap.fill(prompt, 34), "black"), ("", "black"),
                (textwrap.fill(f"(A: {to_a(prompt)})", 34), "dimgray"), ("", "black"),
                (f"expected: {example.target}  (A: {to_a(example.target)})", "black")]
        for name, outputs in answers.items():
            answer = outputs[i].strip()
            colour = "green" if rouge_l(answer, example.target) == 1.0 else "firebrick"
            rows.append((f"{name}: {answer or '(nothing)'}", colour))
        rows.insert(5, ("", "black"))
        for line, (words, colour) in enumerate(rows):
            text.text(0.0, 1.0 - line / lines, words, fontsize=7, color=colour, va="top",
                      wrap=True, transform=text.transAxes)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
