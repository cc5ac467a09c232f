"""Every dispatch strategy on the micro zoo world, checked against a per-example reference."""

from __future__ import annotations

import pytest
import torch

from shoal.adapt import SVFAdapter, adapt_evaluate, label_scores, load_expert, load_or_compute_svd, routing_task
from shoal.adapt import train_svf
from shoal.adapt.dispatch import OTHER, routing_prompt
from shoal.eval import evaluate, load_model

TEMPLATE = "{prompt} question : {labels} ? answer :"


@pytest.fixture(scope="module")
def micro_experts(micro_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapt-micro")
    model, tokenizer = load_model(micro_world.model("base"))
    common = dict(objective="sft", lr=0.05, steps=3, batch_size=8, eval_every=3, validation_limit=8,
                  cache_dir=root / "svd")
    experts = {label: train_svf(model, tokenizer, micro_world.task(task), out=root / f"{label}.safetensors",
                                label=label, **common).path
               for label, task in (("many", "math_a"), ("sort", "sort"))}
    routing = routing_task([("many", micro_world.task("math_a")), ("sort", micro_world.task("sort"))],
                           template=TEMPLATE, per_task=32)
    classifier = train_svf(model, tokenizer, routing, out=root / "classifier.safetensors", **common).path
    return model, tokenizer, experts, classifier, root / "svd"


@pytest.mark.parametrize("strategy", ["base", "prompt", "classifier", "few-shot"])
def test_strategy_scores_each_example_with_its_expert(micro_world, micro_experts, strategy):
    model, tokenizer, experts, classifier, svd = micro_experts
    task = micro_world.task("math_b")
    result = adapt_evaluate(model, tokenizer, task, "test", [experts["many"], experts["sort"]], strategy=strategy,
                            classifier=classifier, limit=12, template=TEMPLATE, n_shots=4, cem_iterations=2,
                            cem_population=4, cache_dir=svd)
    assert result.n == 12 == len(result.assignments) == sum(result.categories.values())
    factors = load_or_compute_svd(model, cache_dir=svd)
    adapter = SVFAdapter(model, factors)
    zs = {name: load_expert(path, factors).z for name, path in experts.items()}
    if strategy == "few-shot":
        alpha = torch.tensor(result.alpha)  # (experts, matrices in sorted name order): one alpha per matrix
        zs["mixture"] = {n: alpha[0, j] * zs["many"][n] + alpha[1, j] * zs["sort"][n]
                         for j, n in enumerate(sorted(factors.names))}
    if strategy in ("prompt", "classifier"):  # pass 1: the argmax of the label scores
        labels = ["many", "sort", OTHER]
        contexts = [routing_prompt(ex.prompt, labels, TEMPLATE) for ex in task.examples("test")[:12]]
        with adapter.applied(load_expert(classifier, factors).z if strategy == "classifier" else None):
            expected = [labels[j] for j in label_scores(model, tokenizer, contexts, labels).argmax(-1).tolist()]
        assert list(result.assignments) == expected
    # pass 2: each example scored by `shoal eval` with its assigned weights
    for i, (assigned, score) in enumerate(zip(result.assignments, result.scores)):
        with adapter.applied(zs.get(assigned)):
            reference = evaluate(model, tokenizer, _OneExample(task, i), "test")
        assert score == reference.score, (i, assigned)
    assert result.score == pytest.approx(sum(result.scores) / 12)


class _OneExample:
    """The i-th test example of a task, as a task of its own."""

    def __init__(self, task, index: int) -> None:
        self.task, self.index = task, index
        self.name, self.kind, self.max_new_tokens = task.name, task.kind, task.max_new_tokens

    def examples(self, split: str):
        return [self.task.examples(split)[self.index]]

    def score(self, output: str, example) -> float:
        return self.task.score(output, example)
