"""Two-pass inference: pass 1 picks the expert (dispatch), pass 2 answers with W'.

Prompts are grouped by the expert chosen for them, so the weights are recomposed once per
group, not once per prompt; the base weights are restored at the end. Timings of both passes
are returned so the overhead of pass 1 can be reported.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from torch import nn

from shoal.adapt import _lm
from shoal.adapt.dispatch import (DEFAULT_TEMPLATE, OTHER, FewShotMixture, LabelMode, check_roles, check_template,
                                  dispatch_classifier, dispatch_prompt, few_shot_mixture)
from shoal.adapt.expert import Expert, check_expert, load_expert
from shoal.adapt.svd_cache import load_or_compute_svd
from shoal.adapt.svf import SVFAdapter, ZVectors
from shoal.errors import ConfigError
from shoal.eval.generation import generate_greedy
from shoal.eval.task import Example, Task
from shoal.progress import ProgressFn, no_progress

Strategy = Literal["base", "prompt", "classifier", "few-shot"]
STRATEGIES: tuple[str, ...] = ("base", "prompt", "classifier", "few-shot")
MIXTURE = "mixture"


@dataclass(frozen=True)
class TwoPassResult:
    outputs: tuple[str, ...]
    categories: tuple[str, ...]  # per prompt: the chosen expert's name, "other" (base) or "mixture"
    pass1_seconds: float  # dispatch (for few-shot: the CEM search, once per task)
    pass2_seconds: float  # answering
    mixture: FewShotMixture | None = None

    @property
    def overhead(self) -> float:
        """pass-1 time / pass-2 time."""
        return self.pass1_seconds / self.pass2_seconds if self.pass2_seconds > 0 else float("nan")


@dataclass(frozen=True)
class AdaptResult:
    task: str
    split: str
    strategy: str
    score: float
    n: int
    categories: dict[str, int]  # how many examples went to each category
    pass1_seconds: float
    pass2_seconds: float
    alpha: list | None = None  # few-shot mixing weights
    assignments: tuple[str, ...] = ()  # per example: the expert's name, "other" (base) or "mixture"
    scores: tuple[float, ...] = ()  # per example

    @property
    def overhead(self) -> float:
        return self.pass1_seconds / self.pass2_seconds if self.pass2_seconds > 0 else float("nan")


def prepare(model: nn.Module, experts: Sequence[Expert | Path], *, classifier: Expert | Path | None = None,
            transfer: bool = False, cache_dir: Path | None = None,
            progress: ProgressFn = no_progress) -> tuple[SVFAdapter, list[Expert], Expert | None]:
    """Load the experts (checked against ``model``), the SVD of the matrices they adapt, and an adapter."""
    loaded = [e if isinstance(e, Expert) else load_expert(Path(e)) for e in experts]
    clf = classifier if classifier is None or isinstance(classifier, Expert) else load_expert(Path(classifier))
    everyone = loaded + ([clf] if clf is not None else [])
    if not everyone:
        raise ConfigError("two-pass inference needs at least one expert")
    check_roles(loaded, clf)  # before the SVD: a misplaced expert is refused at once
    names = sorted({n for e in everyone for n in e.z})
    factors = load_or_compute_svd(model, patterns=[f"^{re.escape(n)}$" for n in names], cache_dir=cache_dir,
                                  progress=progress)
    for e in everyone:
        check_expert(e, factors, transfer=transfer)
    labels = [e.name for e in loaded]
    if len(set(labels)) != len(labels) or OTHER in labels:
        raise ConfigError(f"expert categories must be distinct and not {OTHER!r}: {labels}")
    kinds = {e.meta.parametrization for e in everyone}
    if len(kinds) > 1:
        raise ConfigError(f"the experts mix SVF parametrizations {sorted(kinds)}; use experts of one kind")
    return SVFAdapter(model, factors, parametrization=kinds.pop()), loaded, clf


def _route(adapter: SVFAdapter, tokenizer: object, prompts: Sequence[str], experts: Sequence[Expert],
           strategy: str, classifier: Expert | None, mode: LabelMode, template: str,
           batch_size: int) -> list[str]:
    """Pass 1: the category of each prompt (an expert's name or "other")."""
    if strategy == "base":
        return [OTHER] * len(prompts)
    if strategy == "prompt":
        chosen = dispatch_prompt(adapter, tokenizer, prompts, experts, mode=mode, template=template,
                                 batch_size=batch_size)
    elif strategy == "classifier":
        if classifier is None:
            raise ConfigError("strategy 'classifier' needs a classifier expert (argument classifier)")
        chosen = dispatch_classifier(adapter, tokenizer, prompts, experts, classifier, mode=mode,
                                     template=template, batch_size=batch_size)
    else:
        raise ConfigError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    return [experts[k].name if k is not None else OTHER for k in chosen]


def _pass1(adapter: SVFAdapter, tokenizer: object, prompts: Sequence[str], experts: Sequence[Expert], strategy: str,
           classifier: Expert | None, *, mode: LabelMode, template: str, task: Task | None,
           shots: Sequence[Example] | None, per_matrix: bool, iterations: int, population: int, seed: int,
           batch_size: int, progress: ProgressFn
           ) -> tuple[list[str], dict[str, ZVectors | None], FewShotMixture | None]:
    """Categories per prompt, the weights of each category, and the few-shot mixture if any."""
    weights: dict[str, ZVectors | None] = {OTHER: None, **{e.name: e.z for e in experts}}
    if strategy != "few-shot":
        return _route(adapter, tokenizer, prompts, experts, strategy, classifier, mode, template,
                      batch_size), weights, None
    if task is None or not shots:
        raise ConfigError("strategy 'few-shot' needs a task and labelled shots of it")
    mixture = few_shot_mixture(adapter, tokenizer, experts, task, shots, per_matrix=per_matrix,
                               iterations=iterations, population=population, seed=seed, batch_size=batch_size,
                               progress=progress)
    weights[MIXTURE] = mixture.z
    return [MIXTURE] * len(prompts), weights, mixture


def _pass2(adapter: SVFAdapter, categories: Sequence[str], weights: dict[str, ZVectors | None],
           answer: Callable[[list[int]], list[Any]], progress: ProgressFn) -> list[Any]:
    """Answer the rows of each category with its weights, recomposed once per category."""
    results: list[Any] = [None] * len(categories)
    groups: dict[str, list[int]] = {}
    for i, category in enumerate(categories):
        groups.setdefault(category, []).append(i)
    for done, (category, rows) in enumerate(groups.items()):
        adapter.apply(weights[category])
        for i, value in zip(rows, answer(rows)):
            results[i] = value
        progress("answer", done + 1, len(groups))
    adapter.restore()
    return results


def adapt_generate(model: nn.Module, tokenizer: object, prompts: Sequence[str], experts: Sequence[Expert | Path], *,
                   strategy: Strategy = "prompt", classifier: Expert | Path | None = None,
                   max_new_tokens: int = 32, mode: LabelMode = "first-token", template: str = DEFAULT_TEMPLATE,
                   task: Task | None = None, shots: Sequence[Example] | None = None, per_matrix: bool = True,
                   cem_iterations: int = 50, cem_population: int = 32, seed: int = 0, transfer: bool = False,
                   batch_size: int = 16, cache_dir: Path | None = None,
                   progress: ProgressFn = no_progress) -> TwoPassResult:
    """Greedy answers to ``prompts`` with two-pass self-adaptation (see the module docstring).

    ``few-shot`` needs ``task`` (its scorer) and ``shots`` (labelled examples of it)."""
    check_template(template)
    adapter, loaded, clf = prepare(model, experts, classifier=classifier, transfer=transfer, cache_dir=cache_dir,
                                   progress=progress)
    try:
        began = time.perf_counter()
        categories, weights, mixture = _pass1(
            adapter, tokenizer, prompts, loaded, strategy, clf, mode=mode, template=template, task=task,
            shots=shots, per_matrix=per_matrix, iterations=cem_iterations, population=cem_population, seed=seed,
            batch_size=batch_size, progress=progress)
        pass1 = time.perf_counter() - began
        began = time.perf_counter()
        outputs = _pass2(adapter, categories, weights, lambda rows: generate_greedy(
            model, tokenizer, [prompts[i] for i in rows], max_new_tokens=max_new_tokens, batch_size=batch_size),
            progress)
        pass2 = time.perf_counter() - began
    finally:
        adapter.restore()
    return TwoPassResult(tuple(outputs), tuple(categories), pass1, pass2, mixture)


def adapt_evaluate(model: nn.Module, tokenizer: object, task: Task, split: str, experts: Sequence[Expert | Path], *,
                   strategy: Strategy = "prompt", classifier: Expert | Path | None = None, limit: int | None = None,
                   mode: LabelMode = "first-token", template: str = DEFAULT_TEMPLATE, n_shots: int = 10,
                   shots_split: str = "fitness", per_matrix: bool = True, cem_iterations: int = 50,
                   cem_population: int = 32, seed: int = 0, transfer: bool = False, batch_size: int = 16,
                   cache_dir: Path | None = None, progress: ProgressFn = no_progress) -> AdaptResult:
    """Score ``task`` on ``split`` with two-pass self-adaptation.

    ``few-shot`` takes its ``n_shots`` labelled examples from ``shots_split`` (never from the
    evaluated split)."""
    if strategy == "few-shot" and shots_split == split:
        raise ConfigError(f"few-shot examples must come from another split than the evaluated one ({split})")
    check_template(template)
    examples = list(task.examples(split))[:limit]
    if not examples:
        raise ConfigError(f"task {task.name} has no examples in split {split}")
    adapter, loaded, clf = prepare(model, experts, classifier=classifier, transfer=transfer, cache_dir=cache_dir,
                                   progress=progress)
    try:
        began = time.perf_counter()
        shots = list(task.examples(shots_split))[:n_shots] if strategy == "few-shot" else None
        categories, weights, mixture = _pass1(
            adapter, tokenizer, [ex.prompt for ex in examples], loaded, strategy, clf, mode=mode, template=template,
            task=task, shots=shots, per_matrix=per_matrix, iterations=cem_iterations, population=cem_population,
            seed=seed, batch_size=batch_size, progress=progress)
        pass1 = time.perf_counter() - began
        began = time.perf_counter()
        scores = _pass2(adapter, categories, weights, lambda rows: _lm.score_examples(
            model, tokenizer, task, [examples[i] for i in rows], batch_size=batch_size), progress)
        pass2 = time.perf_counter() - began
    finally:
        adapter.restore()
    counts: dict[str, int] = {}
    for category in categories:
        counts[category] = counts.get(category, 0) + 1
    alpha = mixture.alpha.tolist() if mixture is not None else None
    return AdaptResult(task.name, split, strategy, sum(scores) / len(scores), len(scores), counts, pass1, pass2,
                       alpha, tuple(categories), tuple(scores))
