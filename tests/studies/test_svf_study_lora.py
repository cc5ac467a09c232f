"""The study's LoRA baseline is trained by next-token loss (our reading of the paper), REINFORCE on request."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from shoal.errors import ConfigError
from shoal.studies.svf_study import StudySettings, lora_args, run_study

SETTINGS = dict(labels={"sort": "sort"}, steps=2, batch_size=4, eval_every=2, validation_limit=4, limit=4, shots=2,
                cem_iterations=1, cem_population=2)


def _adapter(folder):  # type: ignore[no-untyped-def]
    return load_file(str(folder / "adapter_model.safetensors"))


def _reference_lora(world, out, objective: str, clip: float):  # type: ignore[no-untyped-def]
    """The baseline trained directly, with the arguments the paper's recipe (or SVF's REINFORCE) names."""
    from shoal.eval import load_model
    from shoal.studies.lora_baseline import train_lora

    model, tokenizer = load_model(world.model("base"))
    s = StudySettings(**SETTINGS)
    return train_lora(model, tokenizer, world.task("sort"), out=out, objective=objective, rank=s.lora_rank,
                      lr=s.lora_lr, steps=2, batch_size=4, eval_every=2, validation_limit=4, seed=0, clip=clip,
                      sample=False)


def test_study_lora_defaults_to_next_token_loss_and_can_use_reinforce(micro_world, tmp_path):
    assert StudySettings().lora_objective == "sft" and StudySettings().objective == "reinforce"
    sft = run_study(micro_world, tmp_path / "sft", StudySettings(**SETTINGS))["experts"]["sort"]
    rl = run_study(micro_world, tmp_path / "rl", StudySettings(**SETTINGS, lora_objective="reinforce"))["experts"]["sort"]
    ref_sft = _reference_lora(micro_world, tmp_path / "ref-sft", "sft", 1.0)
    ref_rl = _reference_lora(micro_world, tmp_path / "ref-rl", "reinforce", 1e-3)
    for row, ref, folder in ((sft, ref_sft, "sft"), (rl, ref_rl, "rl")):
        # the same losses step by step, and the same adapter kept
        assert row["lora_history"] == [{"step": r.step, "loss": r.loss, "validation": r.validation}
                                       for r in ref.history]
        mine, theirs = _adapter(tmp_path / folder / "lora-sort"), _adapter(ref.path)
        assert set(mine) == set(theirs) and all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert sft["lora_history"][0]["loss"] > 0  # a next-token loss is a positive NLL ...
    assert sft["lora_history"][0]["loss"] != rl["lora_history"][0]["loss"]  # ... and not REINFORCE's
    # SVF is trained by REINFORCE either way: the LoRA objective does not touch it
    assert sft["svf_history"] == rl["svf_history"] and sft["svf"] == rl["svf"]


def test_lora_args_follow_svf_batches_and_reject_an_unknown_objective():
    s = StudySettings(steps=7, batch_size=64, eval_every=5, validation_limit=9, seed=3)
    args = lora_args(s)
    assert args == dict(objective="sft", steps=7, batch_size=64, eval_every=5, validation_limit=9, seed=3, clip=1.0,
                        sample=False)
    assert lora_args(s.model_copy(update={"lora_objective": "reinforce"}))["clip"] == 1e-3
    with pytest.raises(ConfigError, match="unknown LoRA objective 'ppo'"):
        lora_args(s.model_copy(update={"lora_objective": "ppo"}))


def test_study_refuses_an_unknown_lora_objective_before_training(micro_world, tmp_path):
    with pytest.raises(ConfigError, match="LoRA objective"):
        run_study(micro_world, tmp_path / "s", StudySettings(**SETTINGS, lora_objective="ppo"))
    assert not (tmp_path / "s").exists()


def test_resume_keeps_finished_trainings_and_gives_the_same_results(micro_world, tmp_path, monkeypatch):
    import shoal.studies.lora_baseline as lora_baseline

    first = run_study(micro_world, tmp_path / "s", StudySettings(**SETTINGS))

    def no_training(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("a finished LoRA baseline was retrained")

    monkeypatch.setattr(lora_baseline, "train_lora", no_training)
    again = run_study(micro_world, tmp_path / "s", StudySettings(**SETTINGS), resume=True)
    for key in ("svf", "lora", "base", "svf_history", "lora_history", "lora_best_step", "svf_best_step"):
        assert again["experts"]["sort"][key] == first["experts"]["sort"][key], key
    assert again["two_pass"]["math_b"]["few-shot"]["score"] == first["two_pass"]["math_b"]["few-shot"]["score"]


def test_resume_refuses_other_settings(micro_world, tmp_path):
    run_study(micro_world, tmp_path / "s", StudySettings(**SETTINGS))
    with pytest.raises(ConfigError, match=r"settings.json: the run to resume has other settings \(lora_lr, steps\)"):
        run_study(micro_world, tmp_path / "s", StudySettings(**{**SETTINGS, "steps": 3}, lora_lr=0.5), resume=True)
