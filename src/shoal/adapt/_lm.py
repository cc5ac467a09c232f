"""Small language-model helpers shared by SVF training, dispatch and two-pass inference.

Answers are scored through :func:`shoal.eval.predict`, as ``shoal eval`` scores them, and
continuations for REINFORCE come from the one generation loop,
:func:`shoal.eval.generation.sample_continuations`. What is left here is the right-padded
prompt + completion batch the training losses read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from shoal.eval.evaluate import predict
from shoal.eval.generation import model_device, pad_id, sample_continuations
from shoal.eval.task import Example, Task

__all__ = ["Batch", "encode", "generate", "model_device", "pack", "pad_id", "score_examples"]


def encode(tokenizer: object, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])  # type: ignore[operator]


@dataclass(frozen=True)
class Batch:
    """Right-padded prompt+completion ids; ``completion_mask`` marks completion tokens."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    completion_mask: torch.Tensor  # (B, T) bool


def pack(prompt_ids: Sequence[list[int]], completion_ids: Sequence[list[int]], pad: int,
         device: torch.device | str = "cpu") -> Batch:
    rows = [p + c for p, c in zip(prompt_ids, completion_ids)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    comp = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        attn[i, : len(p) + len(c)] = 1
        comp[i, len(p): len(p) + len(c)] = True
    return Batch(ids.to(device), attn.to(device), comp.to(device))


def generate(model: nn.Module, tokenizer: object, prompts: Sequence[str], *, max_new_tokens: int,
             batch_size: int = 16, sample: bool = False, temperature: float = 1.0,
             generator: torch.Generator | None = None) -> tuple[list[str], list[list[int]]]:
    """Continue each prompt; returns the decoded continuations and their token ids (ending at
    and including the EOS token when one was produced). See
    :func:`shoal.eval.generation.sample_continuations`."""
    return sample_continuations(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                batch_size=batch_size, sample=sample, temperature=temperature,
                                generator=generator)


def score_examples(model: nn.Module, tokenizer: object, task: Task, examples: Sequence[Example], *,
                   batch_size: int = 16) -> list[float]:
    """Per-example scores with the model's weights as they are now, answered exactly as
    ``shoal eval`` answers (greedy generation, or the most likely choice)."""
    if not examples:
        return []
    outputs = predict(model, tokenizer, task, examples, batch_size=batch_size)
    return [float(task.score(out, ex)) for out, ex in zip(outputs, examples)]
