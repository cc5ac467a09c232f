"""Image fitness: fixed noise per prompt, batching that changes nothing, judging and the collapse check."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shoal.eval.drawing import (DrawingTask, DrawingTaskError, draw, judge_images, prompt_noise,
                                score_drawing)


def _task(cells):
    n = len(cells)
    return DrawingTask(name="t", prompts=tuple(f"p{i}" for i in range(n)),
                       noise_seeds=tuple(range(100, 100 + n)),
                       targets={"cell": tuple(cells), "colour": tuple([0] * n)})


class _CellReader:
    """Reads the cell as the brightest of 4 image quadrants, colour always 0."""

    def __call__(self, images):
        quads = torch.stack([images[:, :, :2, :2].mean((1, 2, 3)), images[:, :, :2, 2:].mean((1, 2, 3)),
                             images[:, :, 2:, :2].mean((1, 2, 3)), images[:, :, 2:, 2:].mean((1, 2, 3))], 1)
        return {"cell": quads.argmax(1).numpy(), "colour": np.zeros(images.shape[0], dtype=np.int64)}


def _images_lit_at(cells):
    images = torch.zeros(len(cells), 3, 4, 4)
    for i, c in enumerate(cells):
        r, k = divmod(c, 2)
        images[i, :, 2 * r:2 * r + 2, 2 * k:2 * k + 2] = 1.0
    return images


def test_hits_need_every_attribute_and_stderr_is_n_minus_1():
    task = _task([0, 1, 2, 3])
    score = judge_images(_images_lit_at([0, 1, 2, 0]), task, _CellReader())
    assert score.hits == (1.0, 1.0, 1.0, 0.0) and score.accuracy == 0.75
    assert score.stderr == pytest.approx(np.sqrt(0.75 * 0.25 / 3))
    assert score.per_attribute == {"cell": 0.75, "colour": 1.0}
    assert score.fitness == 0.75  # three distinct readings of four targets: no penalty


def test_an_open_target_accepts_any_reading():
    task = DrawingTask(name="t", prompts=("a", "b"), noise_seeds=(1, 2),
                       targets={"cell": (-1, 1), "colour": (0, 0)})
    score = judge_images(_images_lit_at([3, 2]), task, _CellReader())
    assert score.hits == (1.0, 0.0)


def test_one_safe_image_cannot_win():
    task = _task([0, 1, 2, 3, 0, 1, 2, 3])
    collapsed = judge_images(_images_lit_at([0] * 8), task, _CellReader())
    assert collapsed.accuracy == 0.25 and collapsed.diversity == 0.25
    assert collapsed.fitness == pytest.approx(0.25 * 0.5)


def test_task_and_image_counts_must_agree():
    with pytest.raises(DrawingTaskError, match="3 prompts but 2 noise seeds"):
        DrawingTask(name="x", prompts=("a", "b", "c"), noise_seeds=(1, 2), targets={"cell": (0, 0, 0)})
    with pytest.raises(DrawingTaskError, match="4 prompts but 3 images"):
        judge_images(torch.zeros(3, 3, 4, 4), _task([0, 1, 2, 3]), _CellReader())


def test_prompt_noise_depends_on_the_seed_only():
    a = prompt_noise([5, 6], (4, 8, 8))
    assert torch.equal(a[1], prompt_noise([6], (4, 8, 8))[0])
    assert torch.equal(a[0], torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(5)))


class _EchoPipe:
    """A stand-in pipeline: the image is the starting latents' first 3 channels, squashed;
    it records the batch sizes it was called with."""

    def __init__(self):
        self.calls = []
        self.unet = type("U", (), {"config": type("C", (), {"sample_size": 4, "in_channels": 4})()})()

    def __call__(self, *, prompt, latents, num_inference_steps, guidance_scale, output_type):
        assert output_type == "pt" and len(prompt) == latents.shape[0]
        self.calls.append((len(prompt), num_inference_steps))
        return type("Out", (), {"images": torch.sigmoid(latents[:, :3] * num_inference_steps)})()


def test_draw_batches_without_changing_any_image():
    pipe = _EchoPipe()
    task = _task([0, 1, 2, 3, 0])
    whole = draw(pipe, task.prompts, task.noise_seeds, steps=4, batch_size=64)
    split = draw(pipe, task.prompts, task.noise_seeds, steps=4, batch_size=2)
    assert torch.equal(whole, split) and whole.shape == (5, 3, 4, 4)
    assert pipe.calls == [(5, 4), (2, 4), (2, 4), (1, 4)]
    score = score_drawing(pipe, task, _CellReader(), steps=4)
    assert score.n == 5 and 0.0 <= score.fitness <= score.accuracy <= 1.0


def test_draw_refuses_zero_steps():
    with pytest.raises(DrawingTaskError, match="steps must be at least 1"):
        draw(_EchoPipe(), ["a"], [1], steps=0)


def test_a_real_pipeline_draws_the_same_image_alone_and_in_a_batch(tmp_path):
    pytest.importorskip("diffusers")
    from shoal.zoo.diffusion_models import (DRAWING_SIZES, assemble_pipeline, drawing_tokenizer,
                                            new_scheduler, new_text_encoder, new_unet, new_vae)

    torch.manual_seed(0)
    size = DRAWING_SIZES["micro"]
    tokenizer = drawing_tokenizer()
    pipe = assemble_pipeline(unet=new_unet(size), text_encoder=new_text_encoder(size, tokenizer),
                             vae=new_vae(size), tokenizer=tokenizer, scheduler=new_scheduler())
    prompts = ["big red apples in 1 .", "small blue cups in 9 .", "big green hats in 5 ."]
    together = draw(pipe, prompts, [1, 2, 3], steps=2)
    alone = draw(pipe, prompts[1:2], [2], steps=2)
    assert together.shape == (3, 3, 32, 32)
    torch.testing.assert_close(together[1], alone[0], rtol=1e-4, atol=1e-5)
