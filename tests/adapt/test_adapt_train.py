"""SVF training: SFT lowers the loss, REINFORCE is wired as the reference's formula says, gradients
accumulate over chunks exactly, runs resume."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from adapt_toys import ToyTask, load

from shoal.adapt import SVFAdapter, load_expert, load_or_compute_svd, train_svf
from shoal.adapt.train import _accumulate, _Settings, initial_parameters, state_path, svf_step_loss, to_z
from shoal.errors import ConfigError


def reference_nll(model, tokenizer, examples) -> float:
    """Mean next-token loss of the reference completions, one example at a time."""
    total, count = 0.0, 0
    for ex in examples:
        prompt = tokenizer(ex.prompt)["input_ids"]
        completion = tokenizer(ex.reference, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0]
        targets = ids[0, len(prompt):]
        total += float(F.cross_entropy(logits[len(prompt) - 1: -1], targets, reduction="sum"))
        count += len(completion)
    return total / count


@pytest.mark.parametrize(("parametrization", "lr"), [("direct", 0.3), ("reference", 1.0)])
def test_sft_training_lowers_the_loss_and_keeps_the_best(llama, word_tokenizer, toy_tasks, svd_dir, tmp_path,
                                                         parametrization, lr):
    task = toy_tasks["ay"]
    val = task.examples("validation")
    before = reference_nll(llama, word_tokenizer, val)
    result = train_svf(llama, word_tokenizer, task, out=tmp_path / "ay.safetensors", objective="sft", lr=lr,
                       parametrization=parametrization, steps=20, batch_size=16, eval_every=10, cache_dir=svd_dir)
    factors = load_or_compute_svd(llama, cache_dir=svd_dir)  # weights are the base again after training
    expert = load_expert(result.path, factors)
    adapter = SVFAdapter(llama, factors, parametrization=parametrization)
    with adapter.applied(expert.z):
        after = reference_nll(llama, word_tokenizer, val)
    assert after < before - 0.1
    assert [r.step for r in result.history] == [10, 20]
    assert result.best_score == max([result.base_score] + [r.validation for r in result.history])
    assert result.best_score > result.base_score
    assert expert.meta.parametrization == parametrization
    if parametrization == "reference":  # z = sigmoid(p) of the logits the state holds
        state = torch.load(state_path(result.path), weights_only=True)
        for n, p in state["params"].items():
            torch.testing.assert_close(state["z"][n], torch.sigmoid(p))
            assert 0 < float(state["z"][n].min()) and float(state["z"][n].max()) < 1
    assert expert.meta.objective == "sft" and expert.meta.steps == 20 and expert.meta.task == "ay"
    assert expert.meta.scores["validation"] == result.best_score
    assert result.num_parameters == 192 and result.seconds_per_step > 0


def test_resumed_run_continues_where_it_stopped(tiny_model_dir, word_tokenizer, toy_tasks, svd_dir, tmp_path):
    path = tiny_model_dir("adapt-llama", "llama", seed=1)
    task = toy_tasks["first"]
    kwargs = dict(objective="sft", lr=0.1, batch_size=8, eval_every=2, cache_dir=svd_dir)
    train_svf(load(path), word_tokenizer, task, out=tmp_path / "straight.safetensors", steps=6, **kwargs)
    train_svf(load(path), word_tokenizer, task, out=tmp_path / "resumed.safetensors", steps=4, **kwargs)
    resumed = train_svf(load(path), word_tokenizer, task, out=tmp_path / "resumed.safetensors", steps=6, **kwargs)
    assert [r.step for r in resumed.history] == [2, 4, 6]
    straight = torch.load(state_path(tmp_path / "straight.safetensors"), weights_only=True)
    again = torch.load(state_path(tmp_path / "resumed.safetensors"), weights_only=True)
    assert again["step"] == 6
    for name, z in straight["z"].items():
        torch.testing.assert_close(again["z"][name], z, atol=1e-6, rtol=0)
        assert not torch.equal(z, torch.ones_like(z))
    fresh = train_svf(load(path), word_tokenizer, task, out=tmp_path / "resumed.safetensors", steps=2,
                      resume=False, **kwargs)
    assert [r.step for r in fresh.history] == [2]
    with pytest.raises(ConfigError, match="train-state"):
        train_svf(load(path), word_tokenizer, task, out=tmp_path / "resumed.safetensors", steps=4,
                  **{**kwargs, "objective": "reinforce"})
    with pytest.raises(ConfigError, match="parametrization"):
        train_svf(load(path), word_tokenizer, task, out=tmp_path / "resumed.safetensors", steps=4,
                  parametrization="direct", **kwargs)


def test_reinforce_step_loss_matches_the_formula(llama, word_tokenizer, toy_tasks, svd_dir):
    task = toy_tasks["first"]
    batch = list(task.examples("train")[:4])
    factors = load_or_compute_svd(llama, cache_dir=svd_dir)
    adapter = SVFAdapter(llama, factors)
    gen = torch.Generator().manual_seed(2)
    z = {n: torch.rand(factors.rank(n), generator=gen).requires_grad_() for n in factors.names}
    kl_weight = 0.3
    loss = svf_step_loss(adapter, word_tokenizer, task, batch, z, objective="reinforce", kl=kl_weight, sample=False,
                         generator=torch.Generator())
    # reference: greedy completion from transformers' generate with the expert applied, one prompt at a time
    terms, kls = [], 0.0
    for ex in batch:
        prompt = torch.tensor([word_tokenizer(ex.prompt)["input_ids"]])
        with adapter.applied({n: v.detach() for n, v in z.items()}), torch.no_grad():
            full = llama.generate(prompt, max_new_tokens=task.max_new_tokens, do_sample=False, pad_token_id=0)
            logits = llama(input_ids=full).logits[0]
        with torch.no_grad():
            ref = llama(input_ids=full).logits[0]
        completion = full[0, prompt.shape[1]:].tolist()
        if 2 in completion:
            completion = completion[: completion.index(2) + 1]
        reward = 1.0 if task.score(word_tokenizer.decode(completion, skip_special_tokens=True), ex) else -1.0
        positions = range(prompt.shape[1] - 1, prompt.shape[1] - 1 + len(completion))
        logp = sum(float(torch.log_softmax(logits[p], -1)[t]) for p, t in zip(positions, completion))
        terms.append(logp * reward)
        for p in positions:  # KL(base || adapted), summed over the completion tokens
            lp, lq = torch.log_softmax(logits[p], -1), torch.log_softmax(ref[p], -1)
            kls += float((lq.exp() * (lq - lp)).sum())
    expected = (-sum(terms) + kl_weight * kls) / len(batch)
    assert abs(float(loss.detach()) - expected) < 1e-4
    loss.backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in z.values())
    assert all(torch.equal(adapter.params[n], adapter.originals[n]) for n in factors.names)


def test_reinforce_training_runs_and_records_its_settings(llama, word_tokenizer, toy_tasks, svd_dir, tmp_path):
    result = train_svf(llama, word_tokenizer, toy_tasks["ay"], out=tmp_path / "rl.safetensors", kl=0.1, lr=0.05,
                       steps=3, batch_size=8, eval_every=3, cache_dir=svd_dir)
    state = torch.load(state_path(result.path), weights_only=True)
    assert any(not torch.equal(v, torch.ones_like(v)) for v in state["z"].values())
    meta = load_expert(result.path).meta
    assert (meta.objective, meta.parametrization, meta.kl, meta.lr, meta.steps) == ("reinforce", "reference", 0.1,
                                                                                    0.05, 3)
    assert all(p.requires_grad for p in llama.parameters())  # flags restored


def test_reference_initial_logits():
    from shoal.adapt.svd_cache import SVDFactors

    S = {"w": torch.ones(4000)}
    factors = SVDFactors("f", ("w",), {"w": (4000, 4000)}, {}, S, {})
    p = initial_parameters(factors, "reference", seed=3)["w"]
    assert abs(float(p.mean()) - 0.1) < 1e-3 and abs(float(p.std()) - 0.01) < 1e-3  # 0.1 + 0.01 N(0, 1)
    assert torch.equal(initial_parameters(factors, "reference", seed=3)["w"], p)
    assert torch.equal(initial_parameters(factors, "direct")["w"], torch.ones(4000))


@dataclass(frozen=True)
class MixedRewards:
    """A toy task whose score depends on the example only, so a batch has both rewards."""

    inner: ToyTask
    kind: str = "generate"
    max_new_tokens: int = 2
    name: str = "mixed"

    def examples(self, split):
        return self.inner.examples(split)

    def score(self, output, example) -> float:
        return float(example.target in "cde")


@pytest.mark.parametrize("reward_norm", [False, True])
def test_gradient_accumulation_equals_the_whole_batch(llama, word_tokenizer, toy_tasks, svd_dir, reward_norm):
    """Chunks of 3 give the gradient of the 8-example REINFORCE (+ KL) loss taken at once (with
    rewards normalised over the whole batch, not per chunk)."""
    task = MixedRewards(toy_tasks["first"])
    batch = list(task.examples("train")[:8])
    factors = load_or_compute_svd(llama, cache_dir=svd_dir)
    adapter = SVFAdapter(llama, factors)
    params = initial_parameters(factors, "reference", seed=0)
    whole = {n: v.clone().requires_grad_() for n, v in params.items()}
    svf_step_loss(adapter, word_tokenizer, task, batch, to_z(whole, "reference"), objective="reinforce", kl=0.2,
                  sample=False, generator=torch.Generator(), reward_norm=reward_norm).backward()
    chunked = {n: v.clone().requires_grad_() for n, v in params.items()}
    settings = _Settings("reinforce", "reference", 0.2, 2e-3, 1, 8, 3, 1e-3, 1, False, 0, False, 0.1, None,
                         reward_norm)
    _accumulate(adapter, word_tokenizer, task, batch, chunked, settings, torch.Generator())
    scores = [task.score("", ex) for ex in batch]
    assert 0 < sum(scores) < len(scores)  # both rewards in the batch, and chunks of 3 differ in their mix
    for n in factors.names:
        assert whole[n].grad.abs().sum() > 0
        torch.testing.assert_close(chunked[n].grad, whole[n].grad, atol=1e-8, rtol=1e-4)
