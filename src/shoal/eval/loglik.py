"""Log-likelihood of continuations, for multiple-choice tasks.

A choice task's prediction is the choice whose tokens the model finds most likely after the
prompt: ``argmax_c sum_t log p(c_t | prompt, c_<t)``. Pairs are sorted by length and run in
left-padded batches with explicit positions, so that every row's continuation sits in the
last columns and only those columns' logits are computed (the vocabulary projection is the
largest tensor of a forward pass).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from shoal.eval.generation import forward_arguments, left_pad, model_device, pad_id
from shoal.progress import ProgressFn, no_progress


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of ``context`` and of ``continuation`` as it is tokenized after the context.

    The whole string is encoded once and split where the context's own encoding ends, so that
    a tokenizer that merges across the boundary still scores the continuation's real tokens;
    spaces at the end of the context move to the continuation (``"Q: 2+2 ="`` + ``" 4"``).
    """
    stripped = context.rstrip(" ")
    continuation = context[len(stripped):] + continuation
    context_ids = list(tokenizer(stripped, add_special_tokens=True)["input_ids"])
    whole_ids = list(tokenizer(stripped + continuation, add_special_tokens=True)["input_ids"])
    if whole_ids[:len(context_ids)] == context_ids:
        continuation_ids = whole_ids[len(context_ids):]
    else:
        continuation_ids = list(tokenizer(continuation, add_special_tokens=False)["input_ids"])
    if not context_ids:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise ValueError("an empty context needs a tokenizer with a bos or eos token")
        context_ids = [start]
    return context_ids, continuation_ids


def loglik(model: Any, tokenizer: Any, contexts: Sequence[str], continuations: Sequence[str], *,
           batch_size: int = 64, progress: ProgressFn | None = None) -> list[float]:
    """Summed log-probability of each continuation given its context (natural log).

    An empty continuation scores 0.0. Results are in the order of the inputs.
    """
    if len(contexts) != len(continuations):
        raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    report = progress or no_progress
    total = len(contexts)
    report("loglik", 0, total)
    pairs = [encode_pair(tokenizer, c, x) for c, x in zip(contexts, continuations)]
    order = sorted(range(total), key=lambda i: (-(len(pairs[i][0]) + len(pairs[i][1])), i))
    scores = [0.0] * total
    for start in range(0, total, batch_size):
        rows = order[start:start + batch_size]
        batch = [pairs[i] for i in rows]
        for row, value in zip(rows, _batch_loglik(model, tokenizer, batch)):
            scores[row] = value
        report("loglik", min(start + batch_size, total), total)
    return scores


@torch.inference_mode()
def _batch_loglik(model: Any, tokenizer: Any, pairs: list[tuple[list[int], list[int]]]
                  ) -> list[float]:
    # The last continuation token is only ever a target, never an input. Left padding puts
    # every row's continuation in the last columns, so only those logits need computing.
    sequences = [(ctx + cont)[:-1] if cont else ctx for ctx, cont in pairs]
    keep = max(1, max(len(cont) for _, cont in pairs))
    device = model_device(model)
    input_ids, attention_mask = left_pad(sequences, pad_id(tokenizer), device)  # (B, T)
    accepted = forward_arguments(model)
    kwargs: dict[str, Any] = {"use_cache": False}
    if "position_ids" in accepted:
        kwargs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    if "logits_to_keep" in accepted:
        kwargs["logits_to_keep"] = keep
    logits = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits
    logits = logits[:, -keep:, :]  # (B, K, V): column k predicts the token after it
    results = []
    for i, (_, cont) in enumerate(pairs):
        if not cont:
            results.append(0.0)
            continue
        window = logits[i, keep - len(cont):].float()  # (C, V)
        log_probs = torch.log_softmax(window, dim=-1)
        targets = torch.tensor(cont, dtype=torch.long, device=window.device)
        results.append(float(log_probs.gather(1, targets[:, None]).sum()))
    return results
