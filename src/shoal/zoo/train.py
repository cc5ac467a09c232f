"""A small, plain CPU training loop for the zoo's models.

Documents are tokenized as ``<s> prompt completion </s>`` and packed greedily into rows of
``seq_len`` tokens (a document never straddles two rows; the rest of a row is padding). The
loss is next-token cross-entropy on completion tokens only. AdamW, linear warm-up, cosine
decay to a tenth of the peak learning rate, gradient clipping at 1.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from itertools import islice
from typing import Iterator

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from shoal.progress import ProgressFn, no_progress
from shoal.zoo.corpus import Document

_ENCODE_CHUNK = 2048


@dataclass(frozen=True)
class TrainingSettings:
    """How long and how hard one model is trained."""

    steps: int
    batch_size: int
    seq_len: int
    lr: float
    warmup: int = 50
    weight_decay: float = 0.01


@dataclass(frozen=True)
class PackedRows:
    """Token ids and loss mask, both ``(rows, seq_len)``; mask is 1 where a token is a target."""

    ids: torch.Tensor
    mask: torch.Tensor


def pack(stream: Iterator[Document], tokenizer: PreTrainedTokenizerFast, rows: int,
         seq_len: int) -> PackedRows:
    """Fill ``rows`` rows of ``seq_len`` tokens from ``stream``."""
    backend = tokenizer.backend_tokenizer
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    ids = torch.full((rows, seq_len), pad, dtype=torch.long)
    mask = torch.zeros((rows, seq_len), dtype=torch.bool)
    row, col = 0, 0
    while row < rows:
        chunk = list(islice(stream, _ENCODE_CHUNK))
        prompts = backend.encode_batch([p for p, _ in chunk], add_special_tokens=False)
        completions = backend.encode_batch([c for _, c in chunk], add_special_tokens=False)
        for prompt, completion in zip(prompts, completions):
            tokens = [bos] + prompt.ids + completion.ids + [eos]
            if len(tokens) > seq_len:
                raise ValueError(f"a training document of {len(tokens)} tokens exceeds "
                                 f"seq_len {seq_len}")
            if col + len(tokens) > seq_len:
                row, col = row + 1, 0
                if row == rows:
                    break
            end = col + len(tokens)
            ids[row, col:end] = torch.tensor(tokens)
            mask[row, col + 1 + len(prompt.ids):end] = True
            col = end
    return PackedRows(ids, mask)


def lr_factor(step: int, settings: TrainingSettings) -> float:
    """Linear warm-up, then cosine decay from 1 to 0.1."""
    if step < settings.warmup:
        return (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def masked_loss(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the masked target tokens of a ``(B, T)`` batch."""
    logits = model(input_ids=ids, use_cache=False).logits  # (B, T, V)
    losses = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                             ids[:, 1:].reshape(-1), reduction="none")
    targets = mask[:, 1:].reshape(-1).float()
    return (losses * targets).sum() / targets.sum().clamp(min=1.0)


def train(model: PreTrainedModel, stream: Iterator[Document], tokenizer: PreTrainedTokenizerFast,
          settings: TrainingSettings, *, seed: int, stage: str = "train",
          progress: ProgressFn | None = None) -> list[float]:
    """Train ``model`` in place on documents from ``stream``; return the loss of every step.

    Deterministic for a seed and a thread count: the batch order comes from ``seed``.
    """
    report = progress or no_progress
    rows = pack(stream, tokenizer, settings.steps * settings.batch_size, settings.seq_len)
    order = list(range(rows.ids.shape[0]))
    random.Random(seed).shuffle(order)
    order_t = torch.tensor(order).view(settings.steps, settings.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(0.9, 0.95),
                                  weight_decay=settings.weight_decay, foreach=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, settings))
    model.train()
    losses: list[float] = []
    report(stage, 0, settings.steps)
    for step in range(settings.steps):
        batch = order_t[step]
        loss = masked_loss(model, rows.ids[batch], rows.mask[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        report(stage, step + 1, settings.steps)
    model.eval()
    return losses
