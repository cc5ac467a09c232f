"""A LoRA adapter from a fine-tune: the best low-rank approximation of each weight's change.

For every linear (and, on request, embedding) module of the fine-tune, the task vector
``D = W_ft - W_base`` (out, in) is factored by a truncated SVD, ``D ≈ U_r S_r V_rᵀ``
(Eckart–Young: the best rank-``r`` approximation in Frobenius and spectral norm), into PEFT's
``lora_B @ lora_A`` with ``lora_A = sqrt(S_r) V_rᵀ`` (r, in) and ``lora_B = U_r sqrt(S_r)``
(out, r); ``lora_alpha = r`` makes PEFT's scale 1. mergekit-extract-lora's conventions:
embeddings and the output head are saved whole (``modules_to_save``) unless ``embed_lora``;
modules that are neither linear nor embedding (norms) are saved whole unless
``skip_undecomposable``; a module whose matrix is smaller than the rank gets its full rank
(``rank_pattern``). Bias changes of LoRA modules go to ``lora_B.bias`` (``lora_bias``).
"""

from __future__ import annotations

import json
import logging
import re
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import yaml

from shoal.checkpoint import CheckpointReader, ShardedWriter, open_checkpoint, staged_output, write_model_card
from shoal.errors import MergeError
from shoal.progress import ProgressFn, no_progress

LOG = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model"  # PEFT reads adapter_model.safetensors: one file, never sharded
PEFT_PREFIX = "base_model.model."


def low_rank_factors(delta: torch.Tensor, rank: int, *, distribute_scale: bool = True,
                     sv_epsilon: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with ``B @ A`` the best rank-``rank`` approximation of ``delta`` (out, in).

    A is (r, in), B is (out, r), ``r = min(rank, min(delta.shape))``, lowered further to the
    number of singular values above ``sv_epsilon``. ``distribute_scale`` splits the singular
    values as ``sqrt(S)`` into both factors; otherwise A carries S and B is orthonormal.
    Computed in float32 (float64 inputs stay float64).
    """
    work = delta if delta.dtype == torch.float64 else delta.float()
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    r = min(rank, s.shape[0])
    if sv_epsilon > 0:
        r = min(r, int((s > sv_epsilon).sum()))
    if distribute_scale:
        root = s[:r].sqrt()
        return root[:, None] * vh[:r], u[:, :r] * root[None, :]
    return s[:r, None] * vh[:r], u[:, :r].clone()


@dataclass(frozen=True)
class LoraResult:
    """What an extraction wrote."""

    out: Path
    rank: int  # the adapter's r: the largest rank of any module
    lora_modules: dict[str, int]  # module -> its rank
    modules_to_save: list[str]  # config entries (last name components) saved whole
    saved_whole: list[str] = field(default_factory=list)  # modules saved whole, full names


@dataclass
class _Plan:
    lora: list[tuple[str, str, bool]] = field(default_factory=list)  # module, weight tensor, is embedding
    whole: list[tuple[str, str]] = field(default_factory=list)  # module, weight tensor
    modules_to_save: list[str] = field(default_factory=list)
    all_modules: list[str] = field(default_factory=list)


def _meta_model(reader: CheckpointReader, role: str):  # type: ignore[no-untyped-def]
    """The fine-tune's module tree on the meta device (no memory): which modules are linear layers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = reader.path if reader.path.is_dir() else reader.path.parent
    if reader.config is None:
        raise MergeError(f"{role} {reader.source}: no config.json beside the weights")
    try:
        config = AutoConfig.from_pretrained(folder)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError) as err:
        raise MergeError(f"{role} {reader.source}: transformers cannot build its model: {err}") from None


def _tensor_for(module: str, model: CheckpointReader, tied_to: str | None) -> str | None:
    name = f"{module}.weight"
    if name in model:
        return name
    return tied_to if tied_to is not None and tied_to in model else None


def plan_extraction(model: CheckpointReader, base: CheckpointReader, *, embed_lora: bool,
                    modules_to_save: Sequence[str], include: Sequence[str], exclude: Sequence[str],
                    skip_undecomposable: bool) -> _Plan:
    """Which modules become LoRA pairs and which are saved whole (mergekit's rules)."""
    from torch import nn

    network = _meta_model(model, "model")
    embed_in, embed_out = network.get_input_embeddings(), network.get_output_embeddings()
    embed_name = next((n for n, m in network.named_modules() if m is embed_in), None)
    tied = f"{embed_name}.weight" if embed_name is not None else None
    if embed_lora and embed_in is not None and embed_in.weight.shape[0] != _vocab_rows(base, tied):
        LOG.warning("the fine-tune's vocabulary (%d tokens) differs from the base model's: embeddings are saved "
                    "whole instead of as LoRA", embed_in.weight.shape[0])
        embed_lora = False
    plan = _Plan(modules_to_save=list(dict.fromkeys(modules_to_save)))

    def wanted(name: str) -> bool:
        if include and not any(re.search(r, name) for r in include):
            return False
        return not any(re.search(r, name) for r in exclude)

    for name, module in network.named_modules():
        if not isinstance(getattr(module, "weight", None), torch.Tensor):
            continue
        plan.all_modules.append(name)
        key = name.split(".")[-1]
        is_embedding = module is embed_in or module is embed_out or isinstance(module, nn.Embedding)
        if is_embedding and not embed_lora and not any(re.search(r, name) for r in exclude):
            if key not in plan.modules_to_save:
                LOG.info("saving %s whole (modules_to_save)", key)
                plan.modules_to_save.append(key)
        tensor = _tensor_for(name, model, tied if module is embed_out else None)
        if name in plan.modules_to_save or key in plan.modules_to_save:
            if tensor is None:
                raise MergeError(f"model {model.source}: has no tensor {name + '.weight'!r} for module {name}")
            plan.whole.append((name, tensor))
        elif wanted(name):
            if isinstance(module, (nn.Linear, nn.Embedding)):
                if tensor is None:
                    raise MergeError(f"model {model.source}: has no tensor {name + '.weight'!r} for module {name} "
                                     "(its checkpoint names differ from transformers' module names)")
                plan.lora.append((name, tensor, isinstance(module, nn.Embedding) and module is not embed_out))
            elif not skip_undecomposable:
                if key not in plan.modules_to_save:
                    LOG.warning("%s is a %s, not a linear layer: saved whole", key, type(module).__name__)
                    plan.modules_to_save.append(key)
                if tensor is None:
                    raise MergeError(f"model {model.source}: has no tensor {name + '.weight'!r} for module {name}")
                plan.whole.append((name, tensor))
    return plan


def _vocab_rows(reader: CheckpointReader, name: str | None) -> int | None:
    return reader.shape(name)[0] if name is not None and name in reader else None


def _target_modules(lora: Sequence[str], all_modules: Sequence[str]) -> list[str]:
    """PEFT's target_modules: short names (``q_proj``) when they select exactly the LoRA modules,
    else the full module names."""
    short = sorted({name.split(".")[-1] for name in lora})
    selected = {m for m in all_modules if any(m == k or m.endswith("." + k) for k in short)}
    return short if selected == set(lora) else sorted(lora)


def adapter_config(*, base_reference: str, rank: int, ranks: dict[str, int], target_modules: list[str],
                   modules_to_save: list[str], lora_bias: bool) -> dict:
    """adapter_config.json: a PEFT LoRA config with alpha equal to each module's rank (scale 1)."""
    others = {name: r for name, r in ranks.items() if r != rank}
    return {
        "base_model_name_or_path": base_reference,
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": rank,
        "rank_pattern": others,
        "alpha_pattern": others,
        "target_modules": target_modules,
        "modules_to_save": modules_to_save or None,
        "lora_dropout": 0.0,
        "lora_bias": lora_bias,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def _task_vector(model: CheckpointReader, base: CheckpointReader, name: str, base_name: str) -> torch.Tensor:
    if base_name not in base:
        raise MergeError(f"base model {base.source}: has no tensor {base_name!r} (the fine-tune has)")
    if base.shape(base_name) != model.shape(name):
        raise MergeError(f"tensor {name!r}: shape {list(model.shape(name))} in the fine-tune, "
                         f"{list(base.shape(base_name))} in the base model")
    return model.get(name, dtype=torch.float32) - base.get(base_name, dtype=torch.float32)


def extract_lora(model: str | Path, base: str | Path, out: str | Path, *, rank: int,
                 distribute_scale: bool = True, embed_lora: bool = False, modules_to_save: Sequence[str] = (),
                 include: Sequence[str] = (), exclude: Sequence[str] = (), sv_epsilon: float = 0.0,
                 skip_undecomposable: bool = False, device: str = "cpu", allow_pickle: bool = False,
                 overwrite: bool = False, progress: ProgressFn = no_progress) -> LoraResult:
    """Write a PEFT LoRA adapter folder ``out`` that turns ``base`` into (approximately) ``model``.

    ``rank`` is the largest rank of a LoRA pair; ``device`` is where the SVDs run. The folder
    is staged beside ``out``: on any error nothing is left there.
    """
    from shoal.checkpoint.references import resolve_reference

    if rank < 1:
        raise MergeError(f"rank must be at least 1, got {rank}")
    for pattern in (*include, *exclude):
        try:
            re.compile(pattern)
        except re.error as err:
            raise MergeError(f"module pattern {pattern!r} is not a regular expression: {err}") from None
    from shoal.merge.execute import check_device

    check_device(device)
    with ExitStack() as stack:
        readers = []
        for reference in (model, base):
            location = resolve_reference(str(reference))
            source = location.path if location.path is not None else str(location.hub_id)
            readers.append(stack.enter_context(open_checkpoint(source, allow_pickle=allow_pickle,
                                                               revision=location.revision)))
        tuned, original = readers
        base_reference = _peft_base_reference(str(base), location)
        plan = plan_extraction(tuned, original, embed_lora=embed_lora, modules_to_save=modules_to_save,
                               include=include, exclude=exclude, skip_undecomposable=skip_undecomposable)
        if not plan.lora and not plan.whole:
            raise MergeError(f"model {tuned.source}: no module to extract (check include/exclude patterns)")
        lora_bias = _has_bias_change(tuned, original, plan)
        if lora_bias and any(is_embedding for _, _, is_embedding in plan.lora):
            raise MergeError("PEFT cannot hold bias changes (lora_bias) together with LoRA on embeddings; "
                             "save the embeddings whole (embed_lora=False)")
        _warn_uncovered(tuned, original, plan)
        steps = len(plan.lora) + len(plan.whole)
        ranks: dict[str, int] = {}
        with staged_output(Path(out), overwrite=overwrite) as stage:
            with ShardedWriter(stage, max_shard_bytes=1 << 62, filename_prefix=ADAPTER_WEIGHTS) as writer:
                for step, (module, name, is_embedding) in enumerate(plan.lora, start=1):
                    delta = _task_vector(tuned, original, name, name).to(device)
                    a, b = low_rank_factors(delta.T if is_embedding else delta, rank,
                                            distribute_scale=distribute_scale, sv_epsilon=sv_epsilon)
                    progress("lora modules", step, steps)
                    if a.shape[0] == 0:
                        LOG.info("%s: no singular value above sv_epsilon, left out", module)
                        continue
                    ranks[module] = a.shape[0]
                    out_dtype = tuned.dtype(name)
                    kind, suffix = ("lora_embedding", "") if is_embedding else ("lora", ".weight")
                    writer.add(f"{PEFT_PREFIX}{module}.{kind}_A{suffix}", a.to("cpu", out_dtype).contiguous())
                    writer.add(f"{PEFT_PREFIX}{module}.{kind}_B{suffix}", b.to("cpu", out_dtype).contiguous())
                    if lora_bias and not is_embedding:
                        writer.add(f"{PEFT_PREFIX}{module}.lora_B.bias", _bias_change(tuned, original, module))
                for step, (module, name) in enumerate(plan.whole, start=len(plan.lora) + 1):
                    writer.add(f"{PEFT_PREFIX}{module}.weight", tuned.get(name))
                    if f"{module}.bias" in tuned:
                        writer.add(f"{PEFT_PREFIX}{module}.bias", tuned.get(f"{module}.bias"))
                    progress("lora modules", step, steps)
            top = max(ranks.values(), default=rank)
            config = adapter_config(base_reference=base_reference, rank=top, ranks=ranks,
                                    target_modules=_target_modules(list(ranks), plan.all_modules),
                                    modules_to_save=plan.modules_to_save, lora_bias=lora_bias)
            (stage / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
            settings = {"model": str(model), "base_model": str(base), "max_rank": rank,
                        "distribute_scale": distribute_scale, "embed_lora": embed_lora,
                        "modules_to_save": list(modules_to_save), "include": list(include),
                        "exclude": list(exclude), "sv_epsilon": sv_epsilon,
                        "skip_undecomposable": skip_undecomposable}
            write_model_card(stage, sources=[str(model)], method="extract-lora", base_model=str(base),
                             recipe_yaml=yaml.safe_dump(settings, sort_keys=False), recipe_file=None,
                             title="LoRA adapter extracted from a fine-tune",
                             intro=(f"This PEFT LoRA adapter (rank up to {top}) was extracted with "
                                    "`shoal extract-lora`: applied to the base model it approximates the "
                                    "fine-tune below by the truncated SVD of each weight's change."))
    return LoraResult(Path(out), top, ranks, plan.modules_to_save, [m for m, _ in plan.whole])


def _peft_base_reference(written: str, location) -> str:  # type: ignore[no-untyped-def]
    """What adapter_config.json names as the base: the hub id, the folder as written, or, for a
    scheme reference (``zoo:small/base``) that PEFT cannot resolve, the folder it stands for."""
    if location.path is None:
        return str(location.hub_id)
    return written if Path(written).exists() else str(location.path)


def _bias_change(tuned: CheckpointReader, original: CheckpointReader, module: str) -> torch.Tensor:
    name = f"{module}.bias"
    weight = tuned.shape(f"{module}.weight") if f"{module}.weight" in tuned else None
    if name not in tuned:
        rows = weight[0] if weight is not None else 0
        return torch.zeros(rows, dtype=tuned.dtype(f"{module}.weight"))
    change = tuned.get(name, dtype=torch.float32)
    if name in original:
        change = change - original.get(name, dtype=torch.float32)
    return change.to(tuned.dtype(name))


def _has_bias_change(tuned: CheckpointReader, original: CheckpointReader, plan: _Plan) -> bool:
    for module, _, _ in plan.lora:
        name = f"{module}.bias"
        if name in tuned and (name not in original or not torch.equal(tuned.get(name), original.get(name))):
            return True
    return False


def _warn_uncovered(tuned: CheckpointReader, original: CheckpointReader, plan: _Plan) -> None:
    """Log tensors that changed in the fine-tune but that the adapter does not carry."""
    covered = {name for _, name, _ in plan.lora} | {name for _, name in plan.whole}
    covered |= {f"{m}.bias" for m, _, _ in plan.lora} | {f"{m}.bias" for m, _ in plan.whole}
    changed = [n for n in tuned.tensor_names() if n not in covered and n in original
               and tuned.shape(n) == original.shape(n) and not torch.equal(tuned.get(n), original.get(n))]
    if changed:
        LOG.warning("%d changed tensors are not in the adapter (excluded or not decomposable): %s",
                    len(changed), ", ".join(changed[:5]) + (", ..." if len(changed) > 5 else ""))
