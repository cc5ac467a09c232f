"""The SVF training objectives as small pure functions of logits, token ids and rewards.

REINFORCE with a KL penalty (Transformer², arXiv 2501.06252, eq. 1), as Sakana's reference
code computes it (``optim_modules.Reinforce.step_optimization``):

    loss = (1/B) sum_i [ -r_i * log pi_z(y_i|x_i) + lambda * KL_i ]

where log pi(y|x) is the sum of the completion's token log-probabilities, r is +1 / -1 and
KL_i is ``F.kl_div(log p_adapted, log p_base, log_target=True, reduction="sum")`` over the
completion: KL(base || adapted) summed over the completion tokens (not averaged), so a
lambda means the same as the reference's ``kl_ref_coeff``. :func:`reference_row_losses`
returns the bracket per row; summing it over a batch and dividing by the batch size gives
the loss, also when the batch is processed in chunks (gradient accumulation).

:func:`kl_divergence` (KL(adapted || base) averaged per token) is shoal's earlier form,
still used by the LoRA baseline.
"""

from __future__ import annotations

import torch


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(token t | tokens < t) for t = 1..T-1. logits (B, T, V), input_ids (B, T) -> (B, T-1)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def sequence_logprobs(logits: torch.Tensor, input_ids: torch.Tensor,
                      completion_mask: torch.Tensor) -> torch.Tensor:
    """Sum of the log-probabilities of the completion tokens of each row -> (B,)."""
    mask = completion_mask[:, 1:].to(torch.float32)
    return (token_logprobs(logits, input_ids) * mask).sum(-1)


def reinforce_loss(seq_logprobs: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """-mean_i(log pi(y_i|x_i) * r_i): minimizing it ascends the REINFORCE objective."""
    return -(seq_logprobs * rewards.to(seq_logprobs.dtype)).mean()


def kl_divergence(logits: torch.Tensor, ref_logits: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Mean over completion tokens of KL(p || q) = sum_v p_v (log p_v - log q_v), where p comes from
    ``logits`` (adapted) and q from ``ref_logits`` (base), both predicting the completion tokens."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    logq = torch.log_softmax(ref_logits[:, :-1].float(), dim=-1)
    per_token = (logp.exp() * (logp - logq)).sum(-1)  # (B, T-1)
    mask = completion_mask[:, 1:].to(torch.float32)
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def sequence_kl(logits: torch.Tensor, ref_logits: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Per row, the sum over completion tokens of KL(q || p) = sum_v q_v (log q_v - log p_v), where
    q comes from ``ref_logits`` (base) and p from ``logits`` (adapted) -> (B,)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    logq = torch.log_softmax(ref_logits[:, :-1].float(), dim=-1)
    per_token = (logq.exp() * (logq - logp)).sum(-1)  # (B, T-1)
    return (per_token * completion_mask[:, 1:].to(torch.float32)).sum(-1)


def reference_row_losses(seq_logprobs: torch.Tensor, rewards: torch.Tensor, kl: float = 0.0,
                         seq_kl: torch.Tensor | None = None) -> torch.Tensor:
    """-r_i * log pi(y_i|x_i) + kl * KL_i per row -> (B,); ``seq_kl`` from :func:`sequence_kl`
    (needed when ``kl`` > 0)."""
    rows = -seq_logprobs * rewards.to(seq_logprobs.dtype)
    if kl > 0:
        if seq_kl is None:
            raise ValueError("reference_row_losses: kl > 0 needs seq_kl")
        rows = rows + kl * seq_kl
    return rows


def sft_loss(logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """Next-token loss: mean negative log-likelihood over the completion tokens."""
    mask = completion_mask[:, 1:].to(torch.float32)
    return -(token_logprobs(logits, input_ids) * mask).sum() / mask.sum().clamp(min=1.0)


def shape_rewards(rewards: torch.Tensor, *, normalize: bool = False) -> torch.Tensor:
    """The reference's ``rw_norm``: (r - mean) / max(std, 1e-7) over the batch (population std);
    the rewards unchanged when ``normalize`` is False (its default)."""
    if not normalize:
        return rewards
    return (rewards - rewards.mean()) / rewards.std(unbiased=False).clamp(min=1e-7)


def rewards_from_scores(scores: torch.Tensor) -> torch.Tensor:
    """Map task scores in [0, 1] to rewards in [-1, 1] (1 -> +1, 0 -> -1)."""
    return 2.0 * scores.to(torch.float32) - 1.0
