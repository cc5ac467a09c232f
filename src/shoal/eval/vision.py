"""Batched greedy answers to questions about images, through the model's own processor.

An image example's prompt marks where each image goes with
:data:`shoal.eval.task.IMAGE_PLACEHOLDER`; the processor's image token takes its place, and
the processor expands it into as many positions as the vision tower gives features (LLaVA:
one per patch). Batches are padded on the left, as the text loop in
:mod:`shoal.eval.generation` does, and decoded greedily by the model's own ``generate``
(``do_sample=False``: the argmax of the raw logits), so any transformers vision-language
model with a processor and ``generate`` can answer.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from shoal.errors import TaskError
from shoal.eval.generation import cut_at_stop, model_device, pad_id, stop_token_ids
from shoal.eval.task import IMAGE_PLACEHOLDER, Example
from shoal.progress import ProgressFn, no_progress


def processor_prompt(processor: Any, example: Example) -> str:
    """``example.prompt`` with the processor's image token at each image placeholder.

    A prompt whose placeholders do not match its images raises TaskError naming the prompt."""
    images = example.images or ()
    count = example.prompt.count(IMAGE_PLACEHOLDER)
    if count != len(images):
        raise TaskError(f"an image example has {len(images)} image(s) but {count} "
                        f"{IMAGE_PLACEHOLDER} mark(s) in its prompt {example.prompt[:60]!r}")
    token = getattr(processor, "image_token", None)
    if token is None:
        raise TaskError("image examples need a model with an image processor (its processor "
                        f"{type(processor).__name__} has no image_token)")
    return example.prompt.replace(IMAGE_PLACEHOLDER, token)


def generate_with_images(model: Any, processor: Any, examples: Sequence[Example], *,
                         max_new_tokens: int, batch_size: int = 64,
                         stop_strings: Sequence[str] | None = None,
                         progress: ProgressFn | None = None) -> list[str]:
    """The greedy answer to each image example, in example order, cut before the first stop
    string (special tokens skipped)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    report = progress or no_progress
    total = len(examples)
    report("generate", 0, total)
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None:
        raise TaskError("image examples need a model with a processor (a tokenizer alone "
                        "cannot read images)")
    tokenizer.padding_side = "left"
    prompts = [processor_prompt(processor, e) for e in examples]
    stops = tuple(s for s in (stop_strings or ()) if s)
    eos = sorted(stop_token_ids(model, tokenizer))
    device = model_device(model)
    dtype = next(model.parameters()).dtype
    outputs: list[str] = []
    for start in range(0, total, batch_size):
        batch = examples[start:start + batch_size]
        images = [image for e in batch for image in (e.images or ())]
        inputs = processor(text=prompts[start:start + batch_size], images=images or None,
                           padding=True, return_tensors="pt")
        inputs = {k: v.to(device) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        width = inputs["input_ids"].shape[1]
        with torch.inference_mode():
            generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                       num_beams=1, eos_token_id=eos or None,
                                       pad_token_id=pad_id(tokenizer))
        for row in generated[:, width:].tolist():
            text = tokenizer.decode(row, skip_special_tokens=True)
            outputs.append(cut_at_stop(text, stops))
        report("generate", min(start + batch_size, total), total)
    return outputs
