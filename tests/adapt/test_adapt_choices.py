"""Pass-1 choices with the zoo's word-level tokenizer: expert names it cannot tell apart are
read as choice numbers, the same way in dispatch and in the classifier's routing task."""

from __future__ import annotations

import pytest
import torch

from shoal.adapt import OTHER, classify, label_scores, routing_task
from shoal.adapt.dispatch import category_choices, routing_prompt
from shoal.eval.task import Example
from shoal.zoo.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def zoo_tokenizer():
    return build_tokenizer()


def test_names_unknown_to_the_vocabulary_become_numbers_in_sorted_order(zoo_tokenizer):
    assert zoo_tokenizer(" math_a", add_special_tokens=False)["input_ids"] == \
        zoo_tokenizer(" lang_b", add_special_tokens=False)["input_ids"]  # both <unk>: the failure of issue 19
    for order in (["math_a", "lang_b"], ["lang_b", "math_a"]):
        choices = category_choices(zoo_tokenizer, order)
        assert choices.categories == ("lang_b", "math_a", OTHER) and choices.answers == ("1", "2", "3")
        assert choices.listing() == ["1 lang_b", "2 math_a", "3 other"]
    words = category_choices(zoo_tokenizer, ["sort", "count"])  # words of the vocabulary stay names
    assert words.categories == words.answers == ("sort", "count", OTHER) and not words.numbered


def test_classify_reads_the_choice_numbers(tiny_zoo_model, zoo_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_zoo_model(0)).eval()
    prompts = ["sort : 3 1 2 =", "count : cups hats ="]
    contexts = [routing_prompt(p, ["1 lang_b", "2 math_a", "3 other"]) for p in prompts]
    with torch.no_grad():  # reference: log p(" k" | context) per prompt, one forward pass each
        expected = []
        for context in contexts:
            ids = torch.tensor([zoo_tokenizer(context)["input_ids"]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, -1], -1)
            numbers = [zoo_tokenizer(f" {k}", add_special_tokens=False)["input_ids"][0] for k in (1, 2, 3)]
            expected.append(["lang_b", "math_a", OTHER][int(logp[numbers].argmax())])
    for mode in ("first-token", "loglik", "generate"):
        got = classify(model, zoo_tokenizer, prompts, ["math_a", "lang_b"], mode=mode)
        assert all(c in ("lang_b", "math_a", OTHER) for c in got)
        if mode != "generate":
            assert got == expected, mode
    scores = label_scores(model, zoo_tokenizer, contexts, ["1", "2", "3"])
    assert scores.shape == (2, 3)


def test_routing_task_with_the_tokenizer_trains_the_numbers_dispatch_reads(zoo_tokenizer, micro_world):
    tasks = [("math_a", micro_world.task("math_a")), ("lang_b", micro_world.task("lang_b"))]
    routing = routing_task(tasks, tokenizer=zoo_tokenizer, per_task=3)
    rows = routing.examples("train")
    assert [ex.target for ex in rows[:2]] == ["2", "1"] and rows[0].completion == " 2"
    assert rows[0].prompt == routing_prompt(micro_world.task("math_a").examples("train")[0].prompt,
                                            ["1 lang_b", "2 math_a", "3 other"])
    assert routing.score(" 2", rows[0]) == 1.0 and routing.score(" 1", rows[0]) == 0.0
    assert routing.score(" math_a", rows[0]) == 0.0
    named = routing_task(tasks, per_task=3)  # no tokenizer: the names, as before
    assert named.examples("train")[0].target == "math_a"
    assert isinstance(rows[0], Example)
