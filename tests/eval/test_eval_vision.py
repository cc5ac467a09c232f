"""Image tasks: ROUGE-L against the rouge_score package, and batched answers through a LLaVA
processor matching one-at-a-time greedy generation with transformers' own generate."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pytest
import torch

from shoal.errors import TaskError
from shoal.eval.evaluate import evaluate, predict
from shoal.eval.scoring import rouge_l
from shoal.eval.task import IMAGE_PLACEHOLDER, Example
from shoal.eval.vision import processor_prompt


class _Whitespace:
    def tokenize(self, text: str) -> list[str]:
        return text.lower().split()


def test_rouge_l_matches_rouge_score_on_random_word_lists() -> None:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Whitespace())
    rng = random.Random(0)
    words = "a b c d e 1 2 red blue".split()
    for _ in range(300):
        output = " ".join(rng.choice(words) for _ in range(rng.randint(0, 6)))
        target = " ".join(rng.choice(words) for _ in range(rng.randint(1, 6)))
        expected = scorer.score(target, output)["rougeL"].fmeasure
        assert rouge_l(output, target) == pytest.approx(expected, abs=1e-12), (output, target)


def test_rouge_l_is_one_only_for_an_exact_match_and_cuts_at_stop() -> None:
    assert rouge_l("3 Red  apples", "3 red apples") == 1.0
    assert rouge_l("3 red apples . and more", "3 red apples", stop=".") == 1.0
    assert rouge_l("3 apples red", "3 red apples") < 1.0
    assert rouge_l("", "3 red apples") == 0.0
    # P = 2/2, R = 2/3: F = 0.8
    assert rouge_l("3 apples", "3 red apples") == pytest.approx(0.8)


def test_examples_with_images_compare_by_text_only() -> None:
    one = Example("a <image>", "b", images=(np.zeros((2, 2, 3), np.uint8),))
    two = Example("a <image>", "b", images=(np.ones((2, 2, 3), np.uint8),))
    assert one == two and hash(one) == hash(two)


WORDS = "<pad> <s> </s> <unk> tom has now . red blue apples cups 1 2 3 4".split()


def _tiny_llava(seed: int = 0):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor,
                              PreTrainedTokenizerFast)

    vocab = {w: i for i, w in enumerate(WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>", padding_side="left")
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, image_size=16, patch_size=8, projection_dim=16)
    text = LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32,
                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                       initializer_range=0.5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=3,
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = 0
    images = CLIPImageProcessor(do_resize=False, do_center_crop=False,
                                crop_size={"height": 16, "width": 16})
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy="default", image_token="<unk>",
                               num_additional_image_tokens=1)
    return model, processor


@dataclass(frozen=True)
class _ImageTask:
    examples_: tuple[Example, ...]
    name: str = "pictures"
    kind: Literal["generate", "choice"] = field(default="generate")
    max_new_tokens: int = 3
    stop_strings: tuple[str, ...] = (".",)

    def examples(self, split: str):
        return self.examples_

    def score(self, output: str, example: Example) -> float:
        return rouge_l(output, example.target, stop=".")


def _examples(count: int) -> tuple[Example, ...]:
    rng = np.random.default_rng(0)
    prompts = ["tom has <image> . now tom has", "<image> tom has", "now <image> tom has red"]
    return tuple(Example(prompts[i % 3], "2 red apples",
                         images=(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),))
                 for i in range(count))


def test_batched_image_answers_equal_one_at_a_time_generate() -> None:
    model, processor = _tiny_llava()
    examples = _examples(7)
    task = _ImageTask(examples)
    batched = predict(model, processor, task, examples, batch_size=4)
    for example, answer in zip(examples, batched):
        prompt = processor_prompt(processor, example)
        inputs = processor(text=[prompt], images=list(example.images), return_tensors="pt")
        width = inputs["input_ids"].shape[1]
        # 4 patches, the CLS feature dropped: 4 image positions
        assert (inputs["input_ids"] == 3).sum() == 4
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
        text = processor.tokenizer.decode(out[0, width:], skip_special_tokens=True)
        assert answer == text.split(".", 1)[0]
    assert len(set(batched)) > 1  # the pictures and prompts change the answers


def test_evaluate_scores_image_examples_and_counts_exact_matches(monkeypatch) -> None:
    model, processor = _tiny_llava()
    examples = _examples(5)
    task = _ImageTask(examples)
    outputs = ["2 red apples", "2 red", "blue", "2 red apples ", "1 2"]
    import shoal.eval.vision as vision

    monkeypatch.setattr(vision, "generate_with_images", lambda *a, **k: outputs)
    result = evaluate(model, processor, task, "test")
    assert result.correct == 2
    assert result.scores == tuple(rouge_l(o, "2 red apples") for o in outputs)


def test_an_image_prompt_without_its_placeholder_is_an_error() -> None:
    model, processor = _tiny_llava()
    bad = Example("tom has", "2", images=(np.zeros((16, 16, 3), np.uint8),))
    with pytest.raises(TaskError, match=f"0 {IMAGE_PLACEHOLDER}"):
        predict(model, processor, _ImageTask((bad,)), [bad])
    with pytest.raises(TaskError, match="processor"):
        predict(model, processor.tokenizer, _ImageTask((bad,)), [bad])
