"""Pass 1 (prompt, classifier, few-shot) and two-pass inference on a tiny model and toy tasks."""

from __future__ import annotations

import pytest
import torch

from shoal.adapt import (OTHER, SVFAdapter, adapt_evaluate, adapt_generate, classify, label_scores, load_expert,
                         load_or_compute_svd, routing_task)
from shoal.adapt.dispatch import routing_prompt
from shoal.errors import ConfigError


def reference_label_logprob(model, tokenizer, context: str, label: str, first_only: bool) -> float:
    prompt = tokenizer(context)["input_ids"]
    label_ids = tokenizer(" " + label, add_special_tokens=False)["input_ids"]
    if first_only:
        label_ids = label_ids[:1]
    ids = torch.tensor([prompt + label_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0], -1)
    return sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(label_ids))


def test_label_scores_match_a_per_label_reference(llama, word_tokenizer, toy_tasks):
    prompts = [ex.prompt for ex in toy_tasks["ay"].examples("test")[:3]] + ["bee : c d e = a"]
    labels = ["ay", "bee", OTHER]
    contexts = [routing_prompt(p, labels) for p in prompts]
    for mode in ("first-token", "loglik"):
        got = label_scores(llama, word_tokenizer, contexts, labels, mode=mode, batch_size=3)
        expected = torch.tensor([[reference_label_logprob(llama, word_tokenizer, c, label, mode == "first-token")
                                  for label in labels] for c in contexts])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        assert classify(llama, word_tokenizer, prompts, ["ay", "bee"], mode=mode) == [
            labels[j] for j in expected.argmax(-1).tolist()]


def test_generated_labels_match_transformers_generate(llama, word_tokenizer, toy_tasks):
    prompts = [ex.prompt for ex in toy_tasks["bee"].examples("test")[:4]]
    got = classify(llama, word_tokenizer, prompts, ["ay", "bee"], mode="generate", template="{prompt}")
    for prompt, category in zip(prompts, got):
        ids = torch.tensor([word_tokenizer(prompt)["input_ids"]])
        out = llama.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=0)
        word = word_tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        assert category == (word if word in ("ay", "bee", OTHER) else OTHER)


def test_labels_the_tokenizer_cannot_tell_apart_are_refused(llama, word_tokenizer):
    with pytest.raises(ConfigError, match="'math' and 'code'"):
        classify(llama, word_tokenizer, ["ay : c d e ="], ["math", "code"])  # both <unk>


def test_routing_task_interleaves_labelled_prompts(toy_tasks):
    task = routing_task([("ay", toy_tasks["ay"]), ("bee", toy_tasks["bee"])], other_tasks=[toy_tasks["cee"]],
                        template="{prompt}", per_task=5)
    train = task.examples("train")
    assert [ex.target for ex in train[:6]] == ["ay", "bee", OTHER] * 2 and len(train) == 15
    assert train[1].prompt == toy_tasks["bee"].examples("train")[0].prompt and train[1].completion == " bee"
    assert task.score(" bee c", train[1]) == 1.0 and task.score(" ay", train[1]) == 0.0


def test_classifier_expert_routes_prompts_to_their_expert(trained, word_tokenizer, toy_tasks):
    model, paths = trained["model"], trained["paths"]
    experts = [paths["ay"], paths["bee"]]
    correct = 0
    for name in ("ay", "bee"):
        base = adapt_evaluate(model, word_tokenizer, toy_tasks[name], "test", experts, strategy="base",
                              cache_dir=trained["svd"])
        routed = adapt_evaluate(model, word_tokenizer, toy_tasks[name], "test", experts, strategy="classifier",
                                classifier=paths["classifier"], template=trained["template"],
                                cache_dir=trained["svd"])
        assert base.score == 0.0 and routed.score > 0.5
        assert routed.score == routed.categories.get(name, 0) / routed.n  # right expert <=> right answer here
        correct += routed.categories.get(name, 0)
    assert correct / 32 >= 0.75


def test_two_pass_generation_recomposes_once_per_group(trained, word_tokenizer, toy_tasks, monkeypatch):
    model, paths = trained["model"], trained["paths"]
    prompts = [ex.prompt for name in ("ay", "bee") for ex in toy_tasks[name].examples("test")[:3]]
    applied = []
    original_apply = SVFAdapter.apply

    def counting_apply(self, z):
        applied.append(z is not None)
        original_apply(self, z)

    monkeypatch.setattr(SVFAdapter, "apply", counting_apply)
    result = adapt_generate(model, word_tokenizer, prompts[::-1] + prompts, [paths["ay"], paths["bee"]],
                            strategy="classifier", classifier=paths["classifier"], template=trained["template"],
                            max_new_tokens=2, cache_dir=trained["svd"])
    monkeypatch.undo()
    groups = set(result.categories)
    assert sum(applied) == 1 + len(groups) - (OTHER in groups)  # classifier once, then one per expert group
    assert result.pass1_seconds > 0 and result.pass2_seconds > 0
    # reference: each prompt alone, with its chosen expert, through transformers' generate
    factors = load_or_compute_svd(model, cache_dir=trained["svd"])
    adapter = SVFAdapter(model, factors, parametrization="direct")  # the fixture experts are direct
    experts = {name: load_expert(paths[name], factors).z for name in ("ay", "bee")}
    for prompt, category, output in zip(prompts[::-1] + prompts, result.categories, result.outputs):
        ids = torch.tensor([word_tokenizer(prompt)["input_ids"]])
        with adapter.applied(experts.get(category)), torch.no_grad():
            out = model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
        assert output == word_tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_few_shot_mixture_finds_the_useful_expert(trained, word_tokenizer, toy_tasks):
    model, paths = trained["model"], trained["paths"]
    task = toy_tasks["cee"]  # new prompts, but the answer is the ay expert's skill
    base = adapt_evaluate(model, word_tokenizer, task, "test", [paths["ay"], paths["bee"]], strategy="base",
                          cache_dir=trained["svd"])
    result = adapt_evaluate(model, word_tokenizer, task, "test", [paths["ay"], paths["bee"]], strategy="few-shot",
                            n_shots=6, cem_iterations=3, cem_population=8, per_matrix=False,
                            cache_dir=trained["svd"])
    assert base.score == 0.0 and result.score == 1.0
    assert result.categories == {"mixture": 16}
    alpha = torch.tensor(result.alpha)
    assert alpha.shape == (2,) and alpha[0] > alpha[1]
    per_matrix = adapt_evaluate(model, word_tokenizer, task, "test", [paths["ay"], paths["bee"]],
                                strategy="few-shot", n_shots=6, cem_iterations=1, cem_population=4, per_matrix=True,
                                cache_dir=trained["svd"])
    assert torch.tensor(per_matrix.alpha).shape == (2, 6)
    with pytest.raises(ConfigError, match="another split"):
        adapt_evaluate(model, word_tokenizer, task, "fitness", [paths["ay"]], strategy="few-shot",
                       cache_dir=trained["svd"])
