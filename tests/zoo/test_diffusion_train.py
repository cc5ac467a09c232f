"""The drawing world's training pieces against independent references (diffusers' own scheduler)."""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("diffusers")

from shoal.zoo.captions import all_drawings, labels_of
from shoal.zoo.diffusion_models import new_scheduler
from shoal.zoo.diffusion_models import FEW_STEPS, MANY_STEPS
from shoal.zoo.diffusion_train import (_alpha, ddim_step, render_pool, segment_target,
                                       student_timesteps, teacher_states)


@pytest.mark.parametrize("v_prediction", [False, True])
def test_ddim_step_is_the_schedulers_step(v_prediction):
    scheduler = new_scheduler(v_prediction=v_prediction)
    kind = scheduler.config.prediction_type
    assert kind == ("v_prediction" if v_prediction else "epsilon")
    if v_prediction:  # zero terminal SNR: the first step starts from pure noise
        assert float(scheduler.alphas_cumprod[-1]) == 0.0
    scheduler.set_timesteps(4)
    gen = torch.Generator().manual_seed(0)
    x, out = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    marks = student_timesteps(scheduler, 4)
    assert marks == [999, 749, 499, 249, -1]
    scheduler.set_timesteps(4)
    for t, t_next in zip(marks[:-1], marks[1:]):
        expected = scheduler.step(out, t, x, eta=0.0).prev_sample
        ours = ddim_step(x, out, _alpha(scheduler, t), _alpha(scheduler, t_next), kind)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_the_few_step_schedule_lies_on_the_many_step_one():
    scheduler = new_scheduler()
    for few in {4, FEW_STEPS}:
        assert set(student_timesteps(scheduler, few)) <= set(student_timesteps(scheduler, MANY_STEPS))


@pytest.mark.parametrize("v_prediction", [False, True])
def test_distillation_targets_land_the_student_on_the_teacher_states(v_prediction):
    """A student that outputs the closed-form target reproduces the teacher's states, through
    diffusers' own DDIM step."""
    scheduler = new_scheduler(v_prediction=v_prediction)
    kind = scheduler.config.prediction_type

    class Teacher(torch.nn.Module):
        def forward(self, x, t, h):
            out = 0.3 * x + 0.01 * t.view(-1, 1, 1, 1).float() / 1000 + h.mean()
            return type("Out", (), {"sample": out})()

    gen = torch.Generator().manual_seed(1)
    noise, hidden = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 5, 8, generator=gen)
    states = teacher_states(Teacher(), hidden, noise, scheduler)
    assert states.shape == (FEW_STEPS + 1, 3, 4, 8, 8) and torch.equal(states[0], noise)
    assert torch.isfinite(states).all()
    marks = student_timesteps(scheduler, FEW_STEPS)
    x = noise
    for k in range(FEW_STEPS):
        a_t, a_n = _alpha(scheduler, marks[k]), _alpha(scheduler, marks[k + 1])
        target = segment_target(x, states[k + 1], a_t, a_n, kind)
        x = scheduler.step(target, marks[k], x, eta=0.0).prev_sample
        torch.testing.assert_close(x, states[k + 1], rtol=1e-4, atol=1e-4)


def test_renders_are_deterministic_and_in_model_range():
    drawings = list(all_drawings()[:6])
    first, second = render_pool(drawings, seed=3), render_pool(drawings, seed=3)
    assert torch.equal(first, second) and first.shape == (6, 3, 32, 32)
    assert first.min() >= -1 and first.max() <= 1
    assert not torch.equal(first, render_pool(drawings, seed=4))


def test_judge_learns_cells_from_renders_and_round_trips(tmp_path):
    from shoal.zoo.diffusion_models import Stage
    from shoal.zoo.judge import judge_accuracy, load_judge, read_images, save_judge, train_judge

    named = [d for d in all_drawings() if d.cell >= 0]
    drawings = [named[i % len(named)] for i in range(384)]
    random.Random(0).shuffle(drawings)
    images = (render_pool(drawings, seed=0) + 1) / 2
    judge = train_judge(images, drawings, Stage(60, 64, 3e-3, 5), seed=0, width=16)
    accuracy = judge_accuracy(judge, named, seed=9)
    assert accuracy["cell"] > 0.5  # chance: 1/4
    save_judge(judge, tmp_path / "judge")
    again = load_judge(tmp_path / "judge")
    reading, reread = read_images(judge, images[:20]), read_images(again, images[:20])
    assert all((reading[k] == reread[k]).all() for k in reading)
    assert set(reading) == set(labels_of(drawings[:1]))


def test_a_damaged_judge_is_named(tmp_path):
    from shoal.zoo.errors import ZooError
    from shoal.zoo.judge import load_judge

    (tmp_path / "judge").mkdir()
    (tmp_path / "judge" / "config.json").write_text("{\"width\": 16}")
    with pytest.raises(ZooError, match="not a drawing-world judge"):
        load_judge(tmp_path / "judge")


def test_denoiser_training_is_deterministic_for_a_seed():
    from shoal.zoo.diffusion_models import (DRAWING_SIZES, Stage, drawing_tokenizer,
                                            new_text_encoder, new_unet)
    from shoal.zoo.diffusion_train import prompt_ids, train_denoiser

    size, tokenizer = DRAWING_SIZES["micro"], drawing_tokenizer()
    drawings = list(all_drawings()[:8])
    ids = prompt_ids(tokenizer, [d.prompt("a") for d in drawings])
    latents = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def run(seed):
        torch.manual_seed(0)
        unet, text = new_unet(size), new_text_encoder(size, tokenizer)
        losses = train_denoiser(unet, text, ids, latents, new_scheduler(), Stage(3, 4, 1e-3, 1),
                                seed=seed, name="t")
        return losses, unet.state_dict()

    (first, a), (second, b), (other, _) = run(1), run(1), run(2)
    assert first == second and first != other
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("v_prediction", [False, True])
def test_a_frozen_text_encoder_stays_as_it_was(v_prediction):
    from shoal.zoo.diffusion_models import (DRAWING_SIZES, Stage, drawing_tokenizer,
                                            new_text_encoder, new_unet)
    from shoal.zoo.diffusion_train import prompt_ids, train_denoiser

    size, tokenizer = DRAWING_SIZES["micro"], drawing_tokenizer()
    drawings = list(all_drawings()[:8])
    ids = prompt_ids(tokenizer, [d.prompt("b") for d in drawings])
    latents = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    unet, text = new_unet(size), new_text_encoder(size, tokenizer)
    before_text = {k: v.clone() for k, v in text.state_dict().items()}
    before_unet = {k: v.clone() for k, v in unet.state_dict().items()}
    losses = train_denoiser(unet, text, ids, latents, new_scheduler(v_prediction=v_prediction),
                            Stage(3, 4, 1e-3, 1), seed=0, name="t", freeze_text=True)
    assert all(map(lambda x: x == x, losses))  # finite, not NaN, at zero terminal SNR too
    assert all(torch.equal(before_text[k], v) for k, v in text.state_dict().items())
    assert any(not torch.equal(before_unet[k], v) for k, v in unet.state_dict().items())
