"""Small language-model helpers shared by SVF training and two-pass inference.

Answers are scored through :func:`shoal.eval.predict`, as ``shoal eval`` scores them. The
sampling loop here (left padding, KV cache, an explicit ``torch.Generator``) exists for
REINFORCE: sampling is reproducible and the generated token ids, not a re-tokenization of
the decoded text, are what the policy gradient scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from shoal.adapt.reinforce import sequence_logprobs
from shoal.eval.evaluate import predict
from shoal.eval.task import Example, Task
from shoal.hf_compat import cache_keyword, cache_of


def pad_id(tokenizer: object) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


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


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate(model: nn.Module, tokenizer: object, prompts: Sequence[str], *, max_new_tokens: int,
             batch_size: int = 16, sample: bool = False, temperature: float = 1.0,
             generator: torch.Generator | None = None) -> tuple[list[str], list[list[int]]]:
    """Continue each prompt; returns the decoded continuations and their token ids (ending at
    and including the EOS token when one was produced)."""
    device = model_device(model)
    pad = pad_id(tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    texts: list[str] = []
    token_ids: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [encode(tokenizer, p, special=True) for p in prompts[start: start + batch_size]]
        width = max(len(c) for c in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attn = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, c in enumerate(chunk):
            ids[i, width - len(c):] = torch.tensor(c, dtype=torch.long)
            attn[i, width - len(c):] = 1
        ids, attn = ids.to(device), attn.to(device)
        positions = (attn.cumsum(-1) - 1).clamp(min=0)
        finished = torch.zeros(len(chunk), dtype=torch.bool, device=device)
        new_tokens: list[torch.Tensor] = []
        past = None
        step_ids = ids
        for _ in range(max_new_tokens):
            out = model(input_ids=step_ids, attention_mask=attn, position_ids=positions,
                        **{cache_keyword(model.forward): past}, use_cache=True)
            logits = out.logits[:, -1].float()  # (B, V)
            if sample:
                probs = torch.softmax(logits / temperature, dim=-1).cpu()
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(device)
            else:
                nxt = logits.argmax(-1)
            nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
            new_tokens.append(nxt)
            if eos is not None:
                finished |= nxt == eos
            if bool(finished.all()):
                break
            past = cache_of(out)
            step_ids = nxt[:, None]
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
        generated = torch.stack(new_tokens, dim=1).tolist() if new_tokens else [[] for _ in chunk]
        for row in generated:
            if eos is not None and eos in row:
                row = row[: row.index(eos) + 1]
            token_ids.append(row)
            texts.append(tokenizer.decode(row, skip_special_tokens=True))  # type: ignore[attr-defined]
    return texts, token_ids


@torch.no_grad()
def continuation_logliks(model: nn.Module, tokenizer: object, contexts: Sequence[str],
                         continuations: Sequence[str], *, batch_size: int = 16) -> list[float]:
    """Sum of log-probabilities of each continuation given its context."""
    device = model_device(model)
    pad = pad_id(tokenizer)
    result: list[float] = []
    for start in range(0, len(contexts), batch_size):
        prompts = [encode(tokenizer, c, special=True) for c in contexts[start: start + batch_size]]
        conts = [encode(tokenizer, c, special=False) for c in continuations[start: start + batch_size]]
        batch = pack(prompts, conts, pad, device)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        result.extend(sequence_logprobs(logits, batch.input_ids, batch.completion_mask).tolist())
    return result


def score_examples(model: nn.Module, tokenizer: object, task: Task, examples: Sequence[Example], *,
                   batch_size: int = 16) -> list[float]:
    """Per-example scores with the model's weights as they are now, answered exactly as
    ``shoal eval`` answers (greedy generation, or the most likely choice)."""
    if not examples:
        return []
    outputs = predict(model, tokenizer, task, examples, batch_size=batch_size)
    return [float(task.score(out, ex)) for out, ex in zip(outputs, examples)]
