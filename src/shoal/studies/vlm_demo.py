"""``shoal demo vlm``: EvoVLM-JP in miniature.

The world's vision-language model (a LLaVA whose language model is a fine-tune of the world's
base) answers stories about pictures in language A; the language-B specialist knows what the
quantity verbs the base never saw at work in B do. The cross task ``vqa_b`` asks stories
about pictures in B with those verbs, answered in B. The search re-weights, layer by layer
(DARE-TIES genes as in ``shoal demo``), the VLM's language model and the specialist relative
to the base; the vision tower and projector are copied from the VLM unchanged.

Rows, all scored on the test split (ROUGE-L and exact match, with n and standard errors):
the VLM, the language specialist (its language model in the VLM's body), the uniform merge,
the equal-budget uniform search, the VLM-only per-layer control (the same search with the
specialist held at 0) and the evolved merge; plus a picture grid of a few test pictures with
every row's answer. Every row is scored on the same test examples, so the evolved merge is
compared with each other row by paired differences (``report.md``, ``demo.json``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from shoal.eval.scoring import mean_stderr
from shoal.evolve.config import EvolveConfig, parse_evolve_config
from shoal.evolve.evaluators import Evaluator
from shoal.merge.recipe import Recipe, load_recipe, parse_recipe
from shoal.progress import ProgressFn, no_progress
from shoal.studies.evolve_demo import relabel

CROSS_TASK = "vqa_b"
REPORT_TASKS = ("vqa_b", "vqa_a", "look_b")
LANGUAGE_SPECIALIST = "lang"
# A language world's tensor names -> where the VLM file keeps its language model's.
LLM_TO_VLM = {"model.": "language_model.model.", "lm_head.": "language_model.lm_head."}
PICTURES = 6

MAIN_STAGES = {"evolve": "main search", "validate": "main search: validation pick",
               "report": "main search: report"}
CONTROL_STAGES = {"evolve": "control search (VLM alone)", "validate": "control search: validation pick",
                  "report": "control search: report"}
UNIFORM_STAGE = "uniform search (equal budget)"
ROWS_STAGE = "test scores"


@dataclass(frozen=True)
class DemoRow:
    """One model's test scores on the cross task: ROUGE-L and exact match, with standard errors."""

    model: str
    rouge_l: float
    rouge_l_stderr: float
    exact: float
    exact_stderr: float
    n: int


@dataclass(frozen=True)
class PairedDifference:
    """The evolved merge minus one other row on the same test examples: mean difference of
    exact match and of ROUGE-L, each with the standard error of that mean."""

    baseline: str
    exact: float
    exact_stderr: float
    rouge_l: float
    rouge_l_stderr: float
    n: int

    @property
    def z(self) -> float:
        """The exact-match difference in standard errors."""
        if self.exact_stderr > 0:
            return self.exact / self.exact_stderr
        return math.inf if self.exact > 0 else 0.0


@dataclass(frozen=True)
class VlmDemoResult:
    out: Path
    rows: tuple[DemoRow, ...]
    pictures: Path
    evolved_recipe: Path
    model: Path | None  # the evolved merge as a LLaVA folder
    differences: tuple[PairedDifference, ...] = ()


def demo_config(world: Any, *, trials: int, limit: int | None, seed: int = 0,
                hold_at_zero: tuple[str, ...] = ()) -> EvolveConfig:
    """The per-layer DARE-TIES search over the VLM's language model and the B specialist."""
    vlm, lang = str(world.model("vlm")), str(world.model(LANGUAGE_SPECIALIST))
    return parse_evolve_config({
        "base_model": {"model": str(world.model("base")), "prefix_map": LLM_TO_VLM},
        "models": [vlm, {"model": lang, "prefix_map": LLM_TO_VLM}],
        "method": "dare_ties",
        "space": {"layer_group_size": 1, "parameters": ["weight", "density"],
                  "ranges": {"weight": [0.0, 2.0]}},
        "fixed": {"normalize": False},
        "hold_at_zero": list(hold_at_zero),
        "fitness": {"task": CROSS_TASK, "split": "fitness", "limit": limit},
        "validation": {"task": CROSS_TASK, "split": "validation", "limit": limit, "top_k": 5},
        "report": {"tasks": list(REPORT_TASKS), "split": "test"},
        "search": {"sampler": "cmaes", "trials": trials, "seed": seed},
        "seed": seed,
        "task_seed": world.seed,
    }, where="VLM demo config")


def source_recipe(world: Any, vlm_weight: float, lang_weight: float) -> Recipe:
    """Task arithmetic of the VLM's language model and the specialist relative to the base,
    the VLM's vision tower and projector copied: (1, 0) is the VLM, (0, 1) the specialist's
    language model in the VLM's body."""
    base, vlm, lang = (str(world.model(n)) for n in ("base", "vlm", LANGUAGE_SPECIALIST))
    return parse_recipe({
        "merge_method": "task_arithmetic", "base_model": base, "base_prefix_map": LLM_TO_VLM,
        "models": [{"model": vlm, "parameters": {"weight": vlm_weight}},
                   {"model": lang, "prefix_map": LLM_TO_VLM, "parameters": {"weight": lang_weight}}],
        "dtype": "float32",
    }, where="VLM demo source recipe")


def row_of(name: str, result: Any) -> DemoRow:
    """A row from an evaluation of the cross task (per-example ROUGE-L scores)."""
    exact = [1.0 if s >= 1.0 else 0.0 for s in result.scores]
    return DemoRow(name, result.score, result.stderr, sum(exact) / len(exact), mean_stderr(exact),
                   result.n)


def markdown_rows(rows: Sequence[DemoRow]) -> str:
    """The demo table: ROUGE-L and exact match in %, each ± one standard error."""
    lines = [f"| model ({CROSS_TASK}, test) | ROUGE-L | exact match | n |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.model} | {100 * r.rouge_l:.1f} ± {100 * r.rouge_l_stderr:.1f} | "
                     f"{100 * r.exact:.1f} ± {100 * r.exact_stderr:.1f} | {r.n} |")
    return "\n".join(lines)


def paired_differences(scores: dict[str, Sequence[float]], evolved: str) -> tuple[PairedDifference, ...]:
    """``evolved`` minus every other row of ``scores`` (per-example ROUGE-L, the same examples
    in the same order for every row), in the rows' order."""
    from shoal.studies.claims_tables import paired_difference

    mine = scores[evolved]
    exact = [1.0 if s >= 1.0 else 0.0 for s in mine]
    out = []
    for name, theirs in scores.items():
        if name == evolved:
            continue
        d_exact, se_exact = paired_difference(exact, [1.0 if s >= 1.0 else 0.0 for s in theirs])
        d_rouge, se_rouge = paired_difference(mine, theirs)
        out.append(PairedDifference(name, d_exact, se_exact, d_rouge, se_rouge, len(mine)))
    return tuple(out)


def markdown_differences(differences: Sequence[PairedDifference]) -> str:
    """The paired differences in points, each ± one standard error, with exact match in SEs."""
    lines = [f"| evolved − row ({CROSS_TASK}, test) | exact match | (SE) | ROUGE-L | n |",
             "|---|---:|---:|---:|---:|"]
    for d in differences:
        lines.append(f"| {d.baseline} | {100 * d.exact:+.1f} ± {100 * d.exact_stderr:.1f} | "
                     f"{d.z:+.1f} | {100 * d.rouge_l:+.1f} ± {100 * d.rouge_l_stderr:.1f} | {d.n} |")
    return "\n".join(lines)


def run_vlm_demo(*, size: str = "small", out: str | Path = "runs/demo-vlm", trials: int = 120,
                 limit: int | None = None, seed: int = 0, resume: bool = True,
                 progress: ProgressFn = no_progress) -> VlmDemoResult:
    """Build (or reuse) the VLM world, run the searches, score every row on test, draw the grid."""
    from shoal.evolve.run import evolve
    from shoal.evolve.saving import BEST_RECIPE
    from shoal.studies.claims_uniform import uniform_search
    from shoal.studies.vlm_pictures import picture_grid
    from shoal.zoo.vlm_build import build_vlm_world

    out = Path(out)
    world = build_vlm_world(size, seed=seed, progress=relabel(progress, prefix="world build: "))
    config = demo_config(world, trials=trials, limit=limit, seed=seed)
    lang = str(world.model(LANGUAGE_SPECIALIST))
    control = evolve(demo_config(world, trials=trials, limit=limit, seed=seed, hold_at_zero=(lang,)),
                     out / "control", resume=resume, write_model=False, report=False,
                     progress=relabel(progress, CONTROL_STAGES))
    evolved = evolve(config, out / "evolved", resume=resume, report=False,
                     progress=relabel(progress, MAIN_STAGES))
    evaluator = Evaluator(config)
    try:
        found = uniform_search(evaluator, out / "uniform", trials=trials, sampler="cmaes", seed=seed,
                               progress=relabel(progress, prefix=f"{UNIFORM_STAGE}: "))
        candidates = [
            ("VLM", source_recipe(world, 1.0, 0.0)),
            ("language specialist (its LM in the VLM)", source_recipe(world, 0.0, 1.0)),
            ("uniform merge (DARE-TIES density 0.5, weight 1)", evaluator.uniform_recipe()),
            (f"uniform search ({trials} trials: density {found.values['density']:.2f}, "
             f"weight {found.values['weight']:.2f})", found.recipe),
            ("VLM-only per-layer control", load_recipe(control.run_dir / BEST_RECIPE)),
            ("evolved (per-layer VLM + specialist)", load_recipe(evolved.run_dir / BEST_RECIPE)),
        ]
        task = world.task(CROSS_TASK)
        examples = task.examples("test")
        rows, answers, scores = [], {}, {}
        for i, (name, recipe) in enumerate(candidates):
            progress(ROWS_STAGE, i, len(candidates))
            result = evaluator.score_recipe(recipe, CROSS_TASK, "test", None)
            rows.append(row_of(name, result))
            answers[name.split(" (")[0]] = list(result.outputs[:PICTURES])
            scores[name] = list(result.scores)
        progress(ROWS_STAGE, len(candidates), len(candidates))
    finally:
        evaluator.close()
    pictures = picture_grid(examples[:PICTURES], answers, out / "pictures.png",
                            title=f"{CROSS_TASK}: stories about pictures in language B (test)")
    recipe_path = evolved.run_dir / BEST_RECIPE
    differences = paired_differences(scores, candidates[-1][0])
    (out / "report.md").write_text(f"{markdown_rows(rows)}\n\n{markdown_differences(differences)}\n")
    (out / "demo.json").write_text(json.dumps({
        "rows": [asdict(r) for r in rows], "differences": [asdict(d) for d in differences],
        "scores": scores, "uniform_search": found.values,
        "evolved_recipe": str(recipe_path), "control_recipe": str(control.run_dir / BEST_RECIPE),
        "pictures": str(pictures), "world": str(world.root),
        "model": str(evolved.model_dir) if evolved.model_dir else None}, indent=2) + "\n")
    return VlmDemoResult(out=out, rows=tuple(rows), pictures=pictures, evolved_recipe=recipe_path,
                         model=evolved.model_dir, differences=differences)
