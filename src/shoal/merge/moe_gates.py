"""Router rows of a mixture of experts built from dense models, one per expert and layer.

mergekit-moe's gate modes:

- ``hidden`` (alias ``hidden_last``): run the base model on each expert's prompts; the row of
  layer ``l`` is the hidden state entering layer ``l`` at the prompt's last token, averaged
  over the prompts, minus the same for the negative prompts, scaled to unit L2 norm.
  ``hidden_avg`` averages over the prompt's tokens instead of taking the last one.
- ``cheap_embed``: the sum of the prompts' token embeddings, normalized, minus the same for
  the negatives, normalized again; the same row for every layer.
- ``random``: standard normal rows; ``uniform_random``: ``U(-1/sqrt(H), 1/sqrt(H))``, as
  ``torch.nn.Linear`` initializes. Both drawn from the given generator.

Prompts are tokenized without the tokenizer's special tokens, with the BOS token put in
front (as mergekit does), and run one at a time: no padding enters a hidden state.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch

from shoal.errors import CheckpointError, RecipeError
from shoal.merge.moe_config import ExpertSpec
from shoal.progress import ProgressFn, no_progress

LOG = logging.getLogger(__name__)


def unit_rows(rows: torch.Tensor) -> torch.Tensor:
    """``rows`` (..., H) scaled to unit L2 norm along the last axis (zero rows stay zero)."""
    return rows / rows.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)


def random_gates(num_layers: int, num_experts: int, hidden_size: int, *, uniform: bool,
                 generator: torch.Generator) -> torch.Tensor:
    """(L, E, H) random router rows: standard normal, or ``nn.Linear``'s uniform init."""
    shape = (num_layers, num_experts, hidden_size)
    if uniform:
        bound = hidden_size ** -0.5
        return (torch.rand(shape, generator=generator) * 2 - 1) * bound
    return torch.randn(shape, generator=generator)


def prompt_token_ids(tokenizer, prompt: str, *, where: str) -> list[int]:  # type: ignore[no-untyped-def]
    """The prompt's token ids with BOS in front and no other special tokens."""
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    if not ids:
        raise RecipeError(f"{where}: prompt {prompt!r} has no tokens (and the tokenizer has no BOS token)")
    return ids


def _contrast(positive: torch.Tensor, negative: torch.Tensor | None) -> torch.Tensor:
    rows = positive if negative is None else positive - negative
    return unit_rows(rows)


def cheap_embed_gates(experts: Sequence[ExpertSpec], embedding: torch.Tensor, tokenizer,  # type: ignore[no-untyped-def]
                      num_layers: int, *, where: str) -> torch.Tensor:
    """(L, E, H): per expert, the normalized sum of its prompts' token embeddings (negatives subtracted)."""
    embedding = embedding.float()

    def summed(prompts: Sequence[str]) -> torch.Tensor:
        ids = [i for p in prompts for i in prompt_token_ids(tokenizer, p, where=where)]
        if max(ids) >= embedding.shape[0]:
            raise RecipeError(f"{where}: the tokenizer gives token id {max(ids)}, but the base model's "
                              f"embedding has {embedding.shape[0]} rows")
        return unit_rows(embedding[torch.tensor(ids)].sum(dim=0))

    rows = []
    for expert in experts:
        negative = summed(expert.negative_prompts) if expert.negative_prompts else None
        rows.append(_contrast(summed(expert.positive_prompts or ()), negative))
    return torch.stack(rows).unsqueeze(0).expand(num_layers, -1, -1).clone()


@torch.no_grad()
def _layer_inputs(model, ids: list[int], *, average: bool, device: str) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """(L, H): the hidden state entering each decoder layer, at the last token or averaged over tokens."""
    output = model(input_ids=torch.tensor([ids], device=device), output_hidden_states=True, return_dict=True)
    states = torch.stack(output.hidden_states[:-1])[:, 0].float()  # (L, T, H); the last entry is after the final norm
    return states.mean(dim=1) if average else states[:, -1]


def hidden_gates(experts: Sequence[ExpertSpec], model, tokenizer, *, average: bool, device: str,  # type: ignore[no-untyped-def]
                 where: str, progress: ProgressFn = no_progress) -> torch.Tensor:
    """(L, E, H): per expert and layer, the normalized mean layer input on its prompts minus that on its negatives."""

    def mean_state(prompts: Sequence[str]) -> torch.Tensor:
        states = [_layer_inputs(model, prompt_token_ids(tokenizer, p, where=where), average=average, device=device)
                  for p in prompts]
        return torch.stack(states).mean(dim=0)

    rows = []
    for index, expert in enumerate(experts):
        negative = mean_state(expert.negative_prompts) if expert.negative_prompts else None
        rows.append(_contrast(mean_state(expert.positive_prompts or ()), negative))
        progress("gate prompts", index + 1, len(experts))
    gates = torch.stack(rows, dim=1).cpu()  # (L, E, H)
    if not bool(torch.isfinite(gates).all()):
        raise CheckpointError(f"{where}: the base model's hidden states on the prompts are not finite")
    return gates


def load_base_for_gates(location: str | Path, *, revision: str | None, device: str):  # type: ignore[no-untyped-def]
    """The base model (float32, eval mode, on ``device``) for ``hidden`` gates."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(location, revision=revision, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"{location}: cannot load the base model to compute hidden gates: {err}") from None
    return model.to(device).eval()


def load_tokenizer(location: str | Path, *, revision: str | None, mode: str):  # type: ignore[no-untyped-def]
    """The base model's tokenizer, which gate modes that read prompts need."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(location, revision=revision)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{location}: gate_mode {mode} needs the base model's tokenizer, "
                              f"which cannot be loaded: {err}") from None


def warn_degenerate(gates: torch.Tensor, threshold: float = 5.0) -> list[int]:
    """Layers whose router rows are nearly linearly dependent (condition number above ``threshold``):
    some experts will be chosen rarely. Logged as a warning; returned for callers that report it."""
    layers = [layer for layer in range(gates.shape[0])
              if gates.shape[1] > 1 and float(torch.linalg.cond(gates[layer].float())) > threshold]
    if layers:
        LOG.warning("router rows of layer(s) %s are nearly dependent (prompts too similar?): some experts "
                    "will be used rarely", ", ".join(map(str, layers)))
    return layers
