"""The world's vision-language model: a LLaVA built around the world's base language model.

``LlavaForConditionalGeneration`` with a small CLIP vision tower trained from scratch, LLaVA's
two-layer projector, and the world's base Llama as its language model (weights copied). The
image token reuses the tokenizer's ``<unk>`` id, so the vocabulary, ``embed_tokens`` and
``lm_head`` keep the language world's shapes and a merge with any model of that world needs
no vocabulary alignment: the processor expands ``<unk>`` into one position per patch (the CLS
feature is dropped), and the model writes the projected patch features there.

Training (:func:`train_vlm`) is a plain CPU loop: each step takes a batch of image examples
(loss on the answer and the end token only) and a few packed rows of the base's pretraining
text (replay, which keeps the language model's task vector small enough to combine with the
language world's specialists). How long it trains is decided by held-out checks, not by a
fixed step count: a vision tower trained from scratch learns to tell shapes apart after a
plateau whose length depends on the seed (world version 1 trained a fixed 800 steps on a
cosine schedule; seed 1's VLM was still on the plateau and said one kind of thing for every
picture). The rates stay constant until every trained task's check reaches the target, then
cool down and stop.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

from shoal.eval.task import IMAGE_PLACEHOLDER, Example
from shoal.progress import ProgressFn, no_progress
from shoal.zoo.corpus import Document
from shoal.zoo.sizes import VisionShape, VlmTrainingSettings
from shoal.zoo.tokenizer import SPECIAL_TOKENS, UNK
from shoal.zoo.train import masked_loss, pack

IMAGE_TOKEN = UNK


def new_vlm(base: Any, vision: VisionShape, *, seed: int) -> Any:
    """A LLaVA whose language model is a copy of ``base`` (a LlamaForCausalLM) and whose vision
    tower and projector are freshly initialized from ``seed``."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    vision_config = CLIPVisionConfig(
        hidden_size=vision.hidden_size, intermediate_size=vision.intermediate_size,
        num_hidden_layers=vision.num_layers, num_attention_heads=vision.num_heads,
        image_size=vision.image_size, patch_size=vision.patch_size,
        projection_dim=vision.hidden_size)
    text_config = base.config.to_dict()
    text_config.pop("_name_or_path", None)  # where the base was read from is no part of the VLM
    config = LlavaConfig(vision_config=vision_config, text_config=text_config,
                         image_token_id=SPECIAL_TOKENS.index(IMAGE_TOKEN),
                         image_seq_length=image_positions(vision),
                         vision_feature_select_strategy="default", vision_feature_layer=-1,
                         projector_hidden_act="gelu", tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).to(torch.float32)
    model.model.language_model.load_state_dict(base.model.state_dict())
    model.lm_head.load_state_dict(base.lm_head.state_dict())
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(model.generation_config, key, getattr(base.config, key))
    return model


def new_processor(tokenizer: Any, vision: VisionShape) -> Any:
    """The VLM's processor: pictures rescaled and normalized at their own size (no resize, no
    crop), and the world's tokenizer with ``<unk>`` as the image token."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    size = vision.image_size
    images = CLIPImageProcessorPil(do_resize=False, do_center_crop=False, do_convert_rgb=True,
                                size={"shortest_edge": size},
                                crop_size={"height": size, "width": size})
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=vision.patch_size,
                          vision_feature_select_strategy="default", image_token=IMAGE_TOKEN,
                          num_additional_image_tokens=1)


def image_positions(vision: VisionShape) -> int:
    """How many positions one picture takes in the prompt (one per patch)."""
    return (vision.image_size // vision.patch_size) ** 2


def encode_examples(examples: Sequence[Example], tokenizer: Any, vision: VisionShape,
                    processor: Any) -> tuple[list[list[int]], list[int], torch.Tensor]:
    """Token ids of each ``<s> prompt answer </s>`` (image placeholders expanded), where each
    answer starts, and the pixel values ``(N, 3, H, W)`` of the examples' pictures."""
    expanded = IMAGE_TOKEN * image_positions(vision)
    backend = tokenizer.backend_tokenizer
    prompts = backend.encode_batch([e.prompt.replace(IMAGE_PLACEHOLDER, expanded) for e in examples],
                                   add_special_tokens=False)
    answers = backend.encode_batch([e.reference for e in examples], add_special_tokens=False)
    ids, starts = [], []
    for prompt, answer in zip(prompts, answers):
        ids.append([tokenizer.bos_token_id] + prompt.ids + answer.ids + [tokenizer.eos_token_id])
        starts.append(1 + len(prompt.ids))
    pictures = [image for e in examples for image in (e.images or ())]
    if len(pictures) != len(examples):
        raise ValueError("every VLM training example needs exactly one picture")
    pixels = processor.image_processor(pictures, return_tensors="pt")["pixel_values"]
    return ids, starts, pixels


def _image_batch(ids: list[list[int]], starts: list[int], pad: int) -> tuple[torch.Tensor, ...]:
    width = max(len(row) for row in ids)
    batch = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.bool)
    attention = torch.zeros((len(ids), width), dtype=torch.long)
    for i, (row, start) in enumerate(zip(ids, starts)):
        batch[i, :len(row)] = torch.tensor(row)
        mask[i, start:len(row)] = True
        attention[i, :len(row)] = 1
    return batch, mask, attention


@dataclass
class TrainingRun:
    """What :func:`train_vlm` did: the image loss of every step, each check (step and the
    fraction of unseen examples per task answered right, teacher-forced), the step the
    cool-down began and whether every task had reached the target by then."""

    losses: list[float] = field(default_factory=list)
    checks: list[dict] = field(default_factory=list)
    cooldown_from: int | None = None
    target_reached: bool = False

    @property
    def steps(self) -> int:
        return len(self.losses)


def _lr_factor(step: int, settings: VlmTrainingSettings, cooldown_from: int | None) -> float:
    if step < settings.warmup:
        return (step + 1) / settings.warmup
    if cooldown_from is None:
        return 1.0
    done = (step - cooldown_from + 1) / max(1, settings.cooldown)
    return 1.0 - 0.9 * min(1.0, done)


class _Checks:
    """The held-out answers of each trained task, encoded once."""

    def __init__(self, examples: Mapping[str, Sequence[Example]], tokenizer: Any,
                 vision: VisionShape, processor: Any) -> None:
        self.tasks = {name: encode_examples(rows, tokenizer, vision, processor)
                      for name, rows in examples.items() if rows}
        self.pad = tokenizer.pad_token_id

    @torch.no_grad()
    def __call__(self, model: Any) -> dict[str, float]:
        model.eval()
        scores = {}
        for name, (ids, starts, pixels) in self.tasks.items():
            batch, mask, attention = _image_batch(ids, starts, self.pad)
            logits = model(input_ids=batch, attention_mask=attention, pixel_values=pixels,
                           use_cache=False).logits
            right = (logits[:, :-1].argmax(-1) == batch[:, 1:]) | ~mask[:, 1:]
            scores[name] = round(right.all(dim=1).float().mean().item(), 4)
        model.train()
        return scores


def train_vlm(model: Any, processor: Any, examples: Sequence[Example], replay: Iterator[Document],
              settings: VlmTrainingSettings, vision: VisionShape, *, seed: int,
              checks: Mapping[str, Sequence[Example]] | None = None,
              progress: ProgressFn | None = None) -> TrainingRun:
    """Train ``model`` in place on ``examples`` (with their pictures) and replayed text until
    every task of ``checks`` (unseen examples by task name) reaches ``settings.target``, then
    cool down (see :class:`shoal.zoo.sizes.VlmTrainingSettings`). Deterministic for a seed and
    a thread count."""
    report = progress or no_progress
    tokenizer = processor.tokenizer
    ids, starts, pixels = encode_examples(examples, tokenizer, vision, processor)
    check = _Checks(checks or {}, tokenizer, vision, processor)
    text = pack(replay, tokenizer, settings.steps * settings.replay_rows, settings.seq_len)
    rng = random.Random(seed)
    order: list[int] = []
    language = [p for n, p in model.named_parameters() if ".language_model." in n or n.startswith("lm_head")]
    language_ids = {id(p) for p in language}
    new = [p for p in model.parameters() if id(p) not in language_ids]
    optimizer = torch.optim.AdamW(
        [{"params": new, "lr": settings.vision_lr}, {"params": language, "lr": settings.language_lr}],
        betas=(0.9, 0.95), weight_decay=settings.weight_decay, foreach=False)
    rates = [group["lr"] for group in optimizer.param_groups]
    run = TrainingRun()
    model.train()
    report("train vlm", 0, settings.steps)
    last_cooldown = max(0, settings.steps - settings.cooldown)
    for step in range(settings.steps):
        if run.cooldown_from is not None and step >= run.cooldown_from + settings.cooldown:
            break
        if run.cooldown_from is None and step >= last_cooldown:
            run.cooldown_from = step
        for group, rate in zip(optimizer.param_groups, rates):
            group["lr"] = rate * _lr_factor(step, settings, run.cooldown_from)
        if len(order) < settings.batch_size:
            fresh = list(range(len(ids)))
            rng.shuffle(fresh)
            order.extend(fresh)
        rows, order = order[:settings.batch_size], order[settings.batch_size:]
        batch, mask, attention = _image_batch([ids[i] for i in rows], [starts[i] for i in rows],
                                              tokenizer.pad_token_id)
        logits = model(input_ids=batch, attention_mask=attention, pixel_values=pixels[rows],
                       use_cache=False).logits  # (B, T, V)
        targets = mask[:, 1:].reshape(-1).float()
        token_losses = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                       batch[:, 1:].reshape(-1), reduction="none")
        loss = (token_losses * targets).sum() / targets.sum().clamp(min=1.0)
        at = step * settings.replay_rows
        text_loss = masked_loss(model, text.ids[at:at + settings.replay_rows],
                                text.mask[at:at + settings.replay_rows])
        optimizer.zero_grad(set_to_none=True)
        (loss + text_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        run.losses.append(loss.item())
        report("train vlm", step + 1, settings.steps)
        if check.tasks and (step + 1) % settings.check_every == 0 and run.cooldown_from is None:
            scores = check(model)
            run.checks.append({"step": step + 1, "loss": round(sum(run.losses[-20:]) / len(run.losses[-20:]), 4),
                               **scores})
            report("check vlm: " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()),
                   step + 1, settings.steps)
            if min(scores.values()) >= settings.target:
                run.target_reached = True
                run.cooldown_from = step + 1
    if check.tasks:
        scores = check(model)
        run.checks.append({"step": run.steps, "loss": round(sum(run.losses[-20:]) / len(run.losses[-20:]), 4),
                           **scores, "final": True})
    model.eval()
    return run
