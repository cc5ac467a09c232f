"""Batched generation with left padding and a KV cache: greedy (evaluation) or sampled (REINFORCE).

Evolutionary search and Transformer² adaptation evaluate thousands of candidates, so this is
the hot loop of shoal. Prompts are sorted by length so that a batch holds prompts of similar
length (little padding), padded on the left so every row's next token sits in the last
column, and run through the model once; then one token per step is fed back with the KV
cache. Rows that have finished (eos or a stop string) are dropped from the batch, and the
batch ends as soon as every row has finished. Greedy decoding takes the argmax of the raw
logits, exactly as ``model.generate(do_sample=False)`` does for a model without logits
processors.

Padding changes the order of floating-point sums inside attention, so a padded row's logits
can differ from the unpadded ones in the last bits. That only matters when the two best
tokens are within rounding of each other: a row that meets such a near tie (in float32 or
float64) is generated again on its own, unpadded, so that the outputs are those of
one-at-a-time generation. (When more than an eighth of a batch ties, the model's logits are
flat, its answers arbitrary, and the batched ones are kept.)

:func:`sample_continuations` runs the same loop for training: prompts in the given order, no
row ever leaves its batch (so a ``torch.Generator`` draws the same numbers for the same
batch whatever finishes first), and the token ids come back with the text, since a policy
gradient scores the sampled ids, not a re-tokenization of their text.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import torch

from shoal.hf_compat import cache_keyword, cache_of
from shoal.progress import ProgressFn, no_progress


def generate_greedy(model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int,
                    batch_size: int = 64, stop_strings: Sequence[str] | None = None,
                    progress: ProgressFn | None = None, recheck_ties: bool = True) -> list[str]:
    """The greedy continuation of each prompt, in the order of ``prompts``.

    Each result is the decoded text of the generated tokens only (special tokens skipped),
    cut before the first occurrence of any of ``stop_strings``; generation of a row stops at
    an eos token, at a stop string, or after ``max_new_tokens`` tokens. With
    ``recheck_ties``, rows that meet a near tie between their two best tokens are generated
    again on their own (see the module docstring).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    report = progress or no_progress
    prompts = list(prompts)
    total = len(prompts)
    report("generate", 0, total)
    if total == 0:
        return []
    stops = tuple(s for s in (stop_strings or ()) if s)
    token_ids = encode_prompts(tokenizer, prompts)
    order = sorted(range(total), key=lambda i: (-len(token_ids[i]), i))
    outputs: list[str] = [""] * total
    for start in range(0, total, batch_size):
        rows = order[start:start + batch_size]
        generated, tied = _generate_batch(model, tokenizer, [token_ids[i] for i in rows],
                                          max_new_tokens=max_new_tokens, stops=stops,
                                          check_ties=recheck_ties and len(rows) > 1)

        # A model with flat logits (a collapsed merge) ties everywhere; its answers are
        # arbitrary anyway, and regenerating them one by one would be slow.
        recheck = tied if len(tied) <= max(2, len(rows) // 8) else []
        for index in recheck:
            generated[index] = _generate_batch(model, tokenizer, [token_ids[rows[index]]],
                                               max_new_tokens=max_new_tokens, stops=stops,
                                               check_ties=False)[0][0]
        for row, tokens in zip(rows, generated):
            outputs[row] = cut_at_stop(_decode(tokenizer, tokens), stops)
        report("generate", min(start + batch_size, total), total)
    return outputs


def sample_continuations(model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int,
                         batch_size: int = 16, sample: bool = True, temperature: float = 1.0,
                         generator: torch.Generator | None = None) -> tuple[list[str], list[list[int]]]:
    """Continue each prompt, sampling from ``softmax(logits / temperature)`` with ``generator``
    (or greedily with ``sample=False``); returns the decoded continuations and their token ids,
    which end with the eos token when one was produced. Batches are taken in the order of
    ``prompts`` and keep every row until the whole batch has finished."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if sample:
        def choose(logits: torch.Tensor) -> torch.Tensor:
            probs = torch.softmax(logits.float() / temperature, dim=-1).cpu()
            return torch.multinomial(probs, 1, generator=generator).squeeze(1).to(logits.device)
    else:
        def choose(logits: torch.Tensor) -> torch.Tensor:
            return logits.float().argmax(-1)
    if not prompts:
        return [], []
    token_ids = encode_prompts(tokenizer, prompts)
    texts: list[str] = []
    ids: list[list[int]] = []
    for start in range(0, len(token_ids), batch_size):
        generated, _ = _generate_batch(model, tokenizer, token_ids[start:start + batch_size],
                                       max_new_tokens=max_new_tokens, stops=(), check_ties=False,
                                       choose=choose, keep_rows=True, keep_eos=True,
                                       eos_ids={tokenizer.eos_token_id} - {None}, last_logits_only=False)
        ids.extend(generated)
        texts.extend(_decode(tokenizer, tokens) for tokens in generated)
    return texts, ids


def encode_prompts(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt as ``tokenizer(prompt)`` gives them (special tokens included);
    an empty encoding becomes the bos (or eos) token so that there is something to condition on."""
    encoded = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    result = []
    for ids in encoded:
        ids = list(ids)
        if not ids:
            if start is None:
                raise ValueError("an empty prompt needs a tokenizer with a bos or eos token")
            ids = [start]
        result.append(ids)
    return result


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    end = len(text)
    for stop in stops:
        at = text.find(stop)
        if 0 <= at < end:
            end = at
    return text[:end]


def stop_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """The ids that end a sequence: the model's generation-config eos ids and the tokenizer's."""
    ids: set[int] = set()
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (config_eos, tokenizer.eos_token_id):
        if value is None:
            continue
        ids.update(value if isinstance(value, (list, tuple)) else [value])
    return ids


def model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


def forward_arguments(model: Any) -> frozenset[str]:
    """Names of the keyword arguments ``model.forward`` declares."""
    return frozenset(inspect.signature(model.forward).parameters)


def _decode(tokenizer: Any, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True) if tokens else ""


def pad_id(tokenizer: Any) -> int:
    """The id used for padding: the pad token, else eos, else 0 (masked out either way)."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if value is not None:
            return int(value)
    return 0  # pragma: no cover


def left_pad(rows: list[list[int]], pad: int, device: torch.device
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both (B, T), rows aligned to the right."""
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, length - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, length - len(ids):] = 1
    return input_ids.to(device), attention_mask.to(device)


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


@torch.inference_mode()
def _generate_batch(model: Any, tokenizer: Any, rows: list[list[int]], *, max_new_tokens: int,
                    stops: tuple[str, ...], check_ties: bool,
                    choose: Callable[[torch.Tensor], torch.Tensor] = _argmax, keep_rows: bool = False,
                    keep_eos: bool = False, eos_ids: set[int] | None = None,
                    last_logits_only: bool = True) -> tuple[list[list[int]], list[int]]:
    """Generated token ids of each row (rows may stop early), and the rows that met a near tie
    on the way (only looked for with ``check_ties``).

    ``choose`` picks each row's next token from the (B, V) logits. Finished rows leave the batch
    when the cache can drop rows, unless ``keep_rows``; rows kept after they finished are fed
    the pad token. ``keep_eos`` ends a row's ids with the eos that finished it. ``eos_ids``
    defaults to :func:`stop_token_ids`; ``last_logits_only`` asks the model for the last
    position's logits only."""
    generated: list[list[int]] = [[] for _ in rows]
    tied: list[int] = []
    if max_new_tokens <= 0:
        return generated, tied
    device = model_device(model)
    accepted = forward_arguments(model)
    if eos_ids is None:
        eos_ids = stop_token_ids(model, tokenizer)
    pad = pad_id(tokenizer)
    input_ids, attention_mask = left_pad(rows, pad, device)  # (B, T)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    extra: dict[str, Any] = {"use_cache": True}
    if last_logits_only and "logits_to_keep" in accepted:
        extra["logits_to_keep"] = 1
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                **_positions(accepted, position_ids), **extra)
    cache = cache_of(out)
    # Finished rows leave the batch when the cache can drop rows; otherwise they ride along
    # and their tokens are ignored.
    compactable = hasattr(cache, "batch_select_indices") and not keep_rows
    next_position = position_ids[:, -1:] + 1  # (B, 1)
    active: list[int | None] = list(range(len(rows)))  # batch row -> index into `generated`
    for step in range(max_new_tokens):
        logits = out.logits[:, -1, :]  # (B, V)
        next_tokens = choose(logits)  # (B,)
        near_tie = _near_ties(logits) if check_ties else None
        for batch_row, token in enumerate(next_tokens.tolist()):
            index = active[batch_row]
            if index is None:
                continue
            if near_tie is not None and near_tie[batch_row] and index not in tied:
                tied.append(index)
            if token in eos_ids:
                active[batch_row] = None
                if keep_eos:
                    generated[index].append(token)
                continue
            generated[index].append(token)
            if stops and _has_stop(tokenizer, generated[index], stops):
                active[batch_row] = None
        alive = [r for r, index in enumerate(active) if index is not None]
        if not alive or step == max_new_tokens - 1:
            break
        if compactable and len(alive) < len(active):
            selected = torch.tensor(alive, dtype=torch.long, device=device)
            cache.batch_select_indices(selected)
            next_tokens = next_tokens[selected]
            attention_mask = attention_mask[selected]
            next_position = next_position[selected]
            active = [active[r] for r in alive]
        elif len(alive) < len(active):
            finished = torch.tensor([index is None for index in active], device=device)
            next_tokens = torch.where(finished, torch.full_like(next_tokens, pad), next_tokens)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(active), 1))], -1)
        out = model(input_ids=next_tokens[:, None], attention_mask=attention_mask,
                    **{cache_keyword(model.forward): cache}, **_positions(accepted, next_position), **extra)
        next_position = next_position + 1
    return generated, tied


# Padding perturbs float32 logits by a few units in the last place; a gap between the two
# best logits below this fraction of their size is treated as a tie that padding could flip.
_TIE_RELATIVE_GAP = 1e-5


def _near_ties(logits: torch.Tensor) -> list[bool] | None:
    """Per row: are the two largest logits within rounding of each other? None for half
    precision, where batched and unbatched results differ anyway."""
    if logits.dtype not in (torch.float32, torch.float64) or logits.shape[-1] < 2:
        return None
    top = logits.topk(2, dim=-1).values  # (B, 2)
    gap = top[:, 0] - top[:, 1]
    return (gap <= _TIE_RELATIVE_GAP * top[:, 0].abs().clamp(min=1.0)).tolist()


def _positions(accepted: frozenset[str], position_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"position_ids": position_ids} if "position_ids" in accepted else {}


def _has_stop(tokenizer: Any, tokens: list[int], stops: tuple[str, ...]) -> bool:
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    return any(stop in text for stop in stops)
