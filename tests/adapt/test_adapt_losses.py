"""The REINFORCE loss (shoal's first form and the reference's), KL terms and next-token loss against a
tiny example computed by hand."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from shoal.adapt import kl_divergence, reference_row_losses, reinforce_loss, sequence_kl, sequence_logprobs, sft_loss
from shoal.adapt.reinforce import rewards_from_scores, shape_rewards

# two rows, three positions, vocabulary of two; the completion is the last token of row 0 and
# the last two tokens of row 1
LOGITS = torch.tensor([[[0.0, 1.0], [2.0, 0.0], [0.0, 0.0]],
                       [[1.0, 1.0], [0.0, 3.0], [5.0, 0.0]]])
REF = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]],
                    [[0.0, 0.0], [1.0, 0.0], [1.0, 0.0]]])
IDS = torch.tensor([[1, 0, 1], [0, 1, 1]])
MASK = torch.tensor([[False, False, True], [False, True, True]])


def log_softmax(row: list[float], i: int) -> float:
    return row[i] - math.log(sum(math.exp(v) for v in row))


def test_sequence_logprobs_by_hand():
    # row 0: token 2 (=1) predicted at position 1 from logits [2, 0]
    row0 = log_softmax([2.0, 0.0], 1)
    # row 1: token 1 (=1) from [1, 1], token 2 (=1) from [0, 3]
    row1 = log_softmax([1.0, 1.0], 1) + log_softmax([0.0, 3.0], 1)
    got = sequence_logprobs(LOGITS, IDS, MASK)
    torch.testing.assert_close(got, torch.tensor([row0, row1]))


def test_reinforce_loss_by_hand():
    row0 = log_softmax([2.0, 0.0], 1)
    row1 = log_softmax([1.0, 1.0], 1) + log_softmax([0.0, 3.0], 1)
    rewards = rewards_from_scores(torch.tensor([1.0, 0.0]))
    assert rewards.tolist() == [1.0, -1.0]
    loss = reinforce_loss(sequence_logprobs(LOGITS, IDS, MASK), rewards)
    assert math.isclose(float(loss), -(row0 * 1 + row1 * -1) / 2, rel_tol=1e-6)


def test_reinforce_gradient_raises_rewarded_and_lowers_punished_sequences():
    logits = LOGITS.clone().requires_grad_()
    reinforce_loss(sequence_logprobs(logits, IDS, MASK), torch.tensor([1.0, -1.0])).backward()
    # descending the loss raises the logit of row 0's chosen token and lowers row 1's
    assert logits.grad[0, 1, 1] < 0 and logits.grad[1, 1, 1] > 0


def kl(p_logits: list[float], q_logits: list[float]) -> float:
    zp = sum(math.exp(v) for v in p_logits)
    zq = sum(math.exp(v) for v in q_logits)
    p = [math.exp(v) / zp for v in p_logits]
    q = [math.exp(v) / zq for v in q_logits]
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def test_kl_divergence_by_hand():
    terms = [kl([2.0, 0.0], [0.0, 0.0]),  # row 0, position 1
             kl([1.0, 1.0], [0.0, 0.0]), kl([0.0, 3.0], [1.0, 0.0])]  # row 1, positions 0 and 1
    got = kl_divergence(LOGITS, REF, MASK)
    assert math.isclose(float(got), sum(terms) / 3, rel_tol=1e-6)
    assert float(kl_divergence(LOGITS, LOGITS, MASK)) == 0.0


def test_sft_loss_by_hand():
    nll = -(log_softmax([2.0, 0.0], 1) + log_softmax([1.0, 1.0], 1) + log_softmax([0.0, 3.0], 1))
    assert math.isclose(float(sft_loss(LOGITS, IDS, MASK)), nll / 3, rel_tol=1e-6)


def test_reference_reinforce_loss_by_hand():
    """Sakana's loss: (1/B) sum_i [-r_i log pi(y_i) + lambda * sum_t KL(base || adapted)]."""
    lam = 0.5
    logp0 = log_softmax([2.0, 0.0], 1)
    logp1 = log_softmax([1.0, 1.0], 1) + log_softmax([0.0, 3.0], 1)
    # KL(q || p): q the base (REF), p the adapted (LOGITS), summed over each row's completion tokens
    kl0 = kl([0.0, 0.0], [2.0, 0.0])
    kl1 = kl([0.0, 0.0], [1.0, 1.0]) + kl([1.0, 0.0], [0.0, 3.0])
    expected = ((-1.0 * logp0 + lam * kl0) + (1.0 * logp1 + lam * kl1)) / 2
    logp = sequence_logprobs(LOGITS, IDS, MASK)
    seq_kl = sequence_kl(LOGITS, REF, MASK)
    torch.testing.assert_close(seq_kl, torch.tensor([kl0, kl1]))
    rows = reference_row_losses(logp, torch.tensor([1.0, -1.0]), lam, seq_kl)
    assert math.isclose(float(rows.sum() / 2), expected, rel_tol=1e-6)
    assert math.isclose(float(reference_row_losses(logp, torch.tensor([1.0, -1.0])).sum() / 2),
                        (-logp0 + logp1) / 2, rel_tol=1e-6)


def test_sequence_kl_is_the_reference_kl_div_call():
    # the reference: F.kl_div(input=adapted log-probs, target=base log-probs, log_target=True, reduction="sum")
    for row, positions in ((0, [1]), (1, [0, 1])):
        logp = torch.log_softmax(LOGITS[row, positions], -1)[None]
        logq = torch.log_softmax(REF[row, positions], -1)[None]
        expected = F.kl_div(input=logp, target=logq, log_target=True, reduction="sum")
        torch.testing.assert_close(sequence_kl(LOGITS, REF, MASK)[row], expected)
    assert float(sequence_kl(LOGITS, REF, MASK)[0]) != float(kl_divergence(LOGITS, REF, MASK))  # not the old form


def test_reward_normalisation_by_hand():
    rewards = torch.tensor([1.0, -1.0, -1.0, -1.0])
    mean, std = -0.5, math.sqrt((1.5 ** 2 + 3 * 0.5 ** 2) / 4)  # population std, as np.std
    expected = [(r - mean) / std for r in rewards.tolist()]
    torch.testing.assert_close(shape_rewards(rewards, normalize=True), torch.tensor(expected))
    assert torch.equal(shape_rewards(rewards), rewards)
    assert torch.equal(shape_rewards(-torch.ones(3), normalize=True), torch.zeros(3))  # std clipped to 1e-7
