"""``shoal demo diffusion``: EvoSDXL-JP in miniature, on the drawing world.

The held-out task is language-B prompts at FEW_STEPS (1) step. Rows, all scored on the test
split's B prompts with the same fixed noise per prompt:

* base at MANY_STEPS and at FEW_STEPS; the language-B specialist (``lang``) and the fast
  specialist (``fast``) at FEW_STEPS;
* the uniform merge (task arithmetic, weight 1 for both specialists);
* the equal-budget uniform search (one shared weight) and the evolved per-block merge
  (CMA-ES over one weight per specialist x UNet block / text-encoder group), both searched on
  the fitness split and picked on the validation split.

The evolved merge is also compared with each baseline image by image (the same test prompts
and noise): the mean paired difference with its standard error over images and over drawings.

It writes ``report.md`` (the tables with n and standard errors), ``grid.png`` (the same test
prompts drawn by each row's model), ``evolved_recipe.yaml`` (the evolved merge as a recipe)
and ``trace.json`` (every evaluated point of both searches).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from shoal.errors import ConfigError
from shoal.eval.drawing import DrawingScore, draw, judge_images, score_drawing
from shoal.eval.scoring import mean_stderr
from shoal.evolve.diffusion_search import PipelineCandidates, evolve_blocks, uniform_search
from shoal.evolve.diffusion_space import GENE_LEVELS, block_space, weights_recipe
from shoal.flow.genes import to_range
from shoal.progress import ProgressFn, no_progress
from shoal.zoo.diffusion_build import DRAWING_WORLD_VERSION, build_drawing_world, load_pipeline
from shoal.zoo.diffusion_models import FEW_STEPS, MANY_STEPS
from shoal.zoo.judge import read_images

SPECIALISTS = ("lang", "fast")
GRID_PROMPTS = 8


@dataclass(frozen=True)
class DemoRow:
    label: str
    steps: int
    score: DrawingScore


@dataclass(frozen=True)
class PairedDifference:
    """The evolved merge minus one baseline row on the same test images (same prompts, same
    noise): the mean difference of the hits, its standard error over the n images, and its
    standard error over the drawings (the copies of one drawing averaged first: the honest one
    when copies of a drawing succeed or fail together)."""

    baseline: str
    steps: int
    difference: float
    stderr: float
    n: int
    stderr_drawings: float
    drawings: int


def paired_difference(evolved: DrawingScore, baseline: DemoRow, *,
                      copies: int = 1) -> PairedDifference:
    """``evolved - baseline`` over the per-image hits; ``copies`` consecutive images are one
    drawing (as :func:`shoal.zoo.captions.drawing_task` lays them out)."""
    n = len(evolved.hits)
    if n != len(baseline.score.hits) or copies < 1 or n % copies:
        raise ValueError(f"{n} evolved hits, {len(baseline.score.hits)} for "
                         f"{baseline.label!r}, {copies} copies per drawing")
    diffs = [a - b for a, b in zip(evolved.hits, baseline.score.hits)]
    per_drawing = [sum(diffs[i:i + copies]) / copies for i in range(0, n, copies)]
    mean = sum(diffs) / n if n else 0.0
    return PairedDifference(baseline.label, baseline.steps, mean, mean_stderr(diffs), n,
                            mean_stderr(per_drawing), len(per_drawing))


@dataclass(frozen=True)
class DiffusionDemoResult:
    rows: tuple[DemoRow, ...]
    out: Path
    evolved_fitness: float
    evolved_validation: float | None
    uniform_weight: float
    evaluations: int
    paired: tuple[PairedDifference, ...] = ()

    def markdown(self) -> str:
        attributes = list(self.rows[0].score.per_attribute) if self.rows else []
        lines = ["| model | steps | test accuracy (B prompts) | SE | n | diversity | fitness | "
                 + " | ".join(attributes) + " |",
                 "|---|---|---|---|---|---|---|" + "---|" * len(attributes)]
        for row in self.rows:
            s = row.score
            lines.append(f"| {row.label} | {row.steps} | {s.accuracy:.3f} | {s.stderr:.3f} | {s.n} "
                         f"| {s.diversity:.2f} | {s.fitness:.3f} | "
                         + " | ".join(f"{s.per_attribute[a]:.2f}" for a in attributes) + " |")
        if self.paired:
            lines += ["", "| evolved minus | steps | difference | SE (images) | n | "
                          "SE (drawings) | drawings | difference / SE (drawings) |",
                      "|---|---|---|---|---|---|---|---|"]
            for d in self.paired:
                ratio = f"{d.difference / d.stderr_drawings:+.1f}" if d.stderr_drawings else "-"
                lines.append(f"| {d.baseline} | {d.steps} | {d.difference:+.3f} | {d.stderr:.3f} "
                             f"| {d.n} | {d.stderr_drawings:.3f} | {d.drawings} | {ratio} |")
        return "\n".join(lines) + "\n"


def _grid_png(rows: Sequence[tuple[str, torch.Tensor]], prompts: Sequence[str], path: Path,
              scale: int = 3) -> None:
    """One row of images per model, one column per prompt (headed by its A reading: the
    models were given the B prompt), labels on the left."""
    from PIL import Image, ImageDraw

    side = rows[0][1].shape[-1] * scale
    label_width, pad, header = 190, 4, 28
    width = label_width + len(prompts) * (side + pad)
    height = header + len(rows) * (side + pad)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    pen = ImageDraw.Draw(sheet)
    for j, prompt in enumerate(prompts):  # "big red apples in 3 ." -> "big red" / "apples 3"
        words = prompt.rstrip(" .").split()
        where = words[4] if len(words) > 4 else "any"
        pen.text((label_width + j * (side + pad), 2), " ".join(words[:2]), fill=(0, 0, 0))
        pen.text((label_width + j * (side + pad), 14), f"{words[2]} {where}", fill=(0, 0, 0))
    for i, (label, images) in enumerate(rows):
        top = header + i * (side + pad)
        pen.text((4, top + side // 2 - 6), label[:32], fill=(0, 0, 0))
        for j in range(len(prompts)):
            array = (images[j].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
            tile = Image.fromarray(array).resize((side, side), Image.NEAREST)
            sheet.paste(tile, (label_width + j * (side + pad), top))
    sheet.save(path)


SETTINGS_FILE = "demo_settings.json"
STUDY_FILE = "study.db"


def _check_settings(out: Path, settings: dict) -> None:
    """The searches of ``out`` resume only under the settings they were started with."""
    path = out / SETTINGS_FILE
    if path.exists():
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"cannot read {path}: {err}") from None
        changed = sorted(k for k in settings if saved.get(k) != settings[k])
        if changed:
            raise ConfigError(f"{out} holds a diffusion demo run with other settings "
                              f"({', '.join(f'{k}: {saved.get(k)!r} there, {settings[k]!r} now' for k in changed)}); "
                              "use a new output folder")
    elif (out / STUDY_FILE).exists():
        raise ConfigError(f"{out / STUDY_FILE} exists but {SETTINGS_FILE} does not; use a new output folder")
    path.write_text(json.dumps(settings, indent=2) + "\n")


def evolved_label(space: Any) -> str:
    """The evolved row's label: ``evolved (per block)``, or per part for the coarse genes."""
    return "evolved (per block)" if space.level == "blocks" else f"evolved (per part, {space.size} genes)"


def run_diffusion_demo(*, size: str = "small", seed: int = 0, out: Path,
                       evaluations: int = 120, test_copies: int = 8, search_copies: int = 16,
                       genes: str = "blocks", search_seed: int | None = None,
                       progress: ProgressFn | None = None) -> DiffusionDemoResult:
    """Build (or find) the drawing world, run both searches, score every row, write the files.

    Both searches keep their Optuna studies in ``out/study.db``: a run that was killed resumes
    where it stopped when started again with the same ``out`` and settings (a finished one is
    scored again without searching); other settings in the same ``out`` are refused.
    ``search_seed`` seeds the CMA-ES sampler (default: the world's ``seed``)."""
    from shoal.evolve.lock import run_lock
    from shoal.evolve.search import default_storage

    report = progress or no_progress
    out = Path(out)
    if genes not in GENE_LEVELS:
        raise ConfigError(f"unknown gene level {genes!r}; expected one of {list(GENE_LEVELS)}")
    search_seed = seed if search_seed is None else search_seed
    out.mkdir(parents=True, exist_ok=True)
    with run_lock(out):
        _check_settings(out, {"size": size, "seed": seed, "evaluations": evaluations,
                              "search_copies": search_copies, "genes": genes, "search_seed": search_seed,
                              "world_version": DRAWING_WORLD_VERSION})
        return _run(size=size, seed=seed, out=out, evaluations=evaluations, test_copies=test_copies,
                    search_copies=search_copies, genes=genes, search_seed=search_seed,
                    storage=default_storage(out), report=report)


def _run(*, size: str, seed: int, out: Path, evaluations: int, test_copies: int, search_copies: int,
         genes: str, search_seed: int, storage: str, report: ProgressFn) -> DiffusionDemoResult:
    world = build_drawing_world(size, seed=seed, progress=report)
    judge = world.judge()

    def read(images: torch.Tensor):
        return read_images(judge, images)

    pipes = {name: load_pipeline(world.model(name)) for name in ("base", *SPECIALISTS)}
    fitness_task = world.task("fitness", "b", copies=search_copies)
    validation_task = world.task("validation", "b", copies=search_copies)
    test_task = world.task("test", "b", copies=test_copies)

    def on(task):
        return lambda pipe: score_drawing(pipe, task, read, steps=FEW_STEPS).fitness

    candidates = PipelineCandidates(pipes["base"], {m: pipes[m] for m in SPECIALISTS})
    space = block_space(pipes["base"].unet.state_dict(), pipes["base"].text_encoder.state_dict(),
                        SPECIALISTS, genes=genes)
    evolved = evolve_blocks(candidates, space, on(fitness_task), on(validation_task),
                            evaluations=evaluations, seed=search_seed, storage=storage,
                            progress=report)
    uniform = uniform_search(candidates, space, on(fitness_task), on(validation_task),
                             evaluations=evaluations, storage=storage, progress=report)
    uniform_weight = to_range(uniform.picked[0], space.low, space.high)
    evolved_weights = space.weights(evolved.picked)

    rows: list[DemoRow] = []
    drawn: list[tuple[str, torch.Tensor]] = []

    def row(label: str, pipe: Any, steps: int) -> None:
        images = draw(pipe, test_task.prompts, test_task.noise_seeds, steps=steps)
        rows.append(DemoRow(label, steps, judge_images(images, test_task, read)))
        drawn.append((f"{label} @{steps}", images[::test_copies][:GRID_PROMPTS]))
        report("score test rows", len(rows), 8)

    report("score test rows", 0, 8)
    row("base", pipes["base"], MANY_STEPS)
    row("base", pipes["base"], FEW_STEPS)
    row("lang (B specialist)", pipes["lang"], FEW_STEPS)
    row(f"fast ({FEW_STEPS}-step specialist)", pipes["fast"], FEW_STEPS)
    row("uniform merge (weight 1)", candidates.apply(space.uniform_weights(1.0)), FEW_STEPS)
    row(f"uniform search (weight {uniform_weight:.2f})",
        candidates.apply(space.uniform_weights(uniform_weight)), FEW_STEPS)
    row(evolved_label(space), candidates.apply(evolved_weights), FEW_STEPS)
    row("lang (B specialist)", pipes["lang"], MANY_STEPS)

    evolved_row = rows[6]
    paired = tuple(paired_difference(evolved_row.score, r, copies=test_copies)
                   for r in rows[2:6] + rows[7:])
    result = DiffusionDemoResult(rows=tuple(rows), out=out, evolved_fitness=max(evolved.fitness),
                                 evolved_validation=evolved.picked_validation,
                                 uniform_weight=uniform_weight, evaluations=evaluations,
                                 paired=paired)
    shown = world.task("test", "a", copies=test_copies).prompts[::test_copies][:GRID_PROMPTS]
    _write_outputs(result, world, space, evolved_weights, evolved, uniform, drawn, shown)
    return result


def _picked_fitness(trace: Any) -> float:
    return trace.fitness[trace.genomes.index(trace.picked)]


def _write_outputs(result, world, space, evolved_weights, evolved, uniform, drawn, prompts) -> None:
    import yaml

    out = result.out
    recipe = weights_recipe(space, evolved_weights, base=str(world.model("base")),
                            sources={m: str(world.model(m)) for m in space.models})
    (out / "evolved_recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    (out / "trace.json").write_text(json.dumps({
        "genes": [g.key for g in space.genes],
        "evolved": {"genomes": evolved.genomes, "fitness": evolved.fitness,
                    "picked": evolved.picked, "picked_validation": evolved.picked_validation},
        "uniform": {"genomes": uniform.genomes, "fitness": uniform.fitness,
                    "picked": uniform.picked, "picked_validation": uniform.picked_validation},
    }, indent=1) + "\n")
    _grid_png(drawn, prompts, out / "grid.png")
    (out / "report.md").write_text(
        f"# Drawing world {world.size}, seed {world.seed}: B prompts at {FEW_STEPS} steps\n\n"
        f"Searches: {result.evaluations} fitness evaluations each (fitness and validation: B "
        f"prompts of held-out drawings). Test: {result.rows[0].score.n} images.\n\n"
        f"Picks (fitness / validation): evolved {_picked_fitness(evolved):.3f} / "
        f"{evolved.picked_validation:.3f}, uniform search {_picked_fitness(uniform):.3f} / "
        f"{uniform.picked_validation:.3f}.\n\n"
        + result.markdown() + "\n![the same test prompts drawn by each row](grid.png)\n")
