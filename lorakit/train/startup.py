"""The start-up lines of `lorakit train`: model, data, method, precision and loss route, steps, resume point, the
ranks and their sharding (several processes), output directory. Rank 0 prints them once the model is ready."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .attention import FP32_UP_TO
from .attention import NAME as CPU_ATTENTION
from .report import human

if TYPE_CHECKING:
    from .trainer import Trainer

PRECISIONS = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}


def startup_lines(trainer: Trainer, model: torch.nn.Module, loss_reason: str | None, resume: Path | None) -> list[str]:
    """What the run is about to do (`loss_reason`: why the chunked loss is off, None when on)."""
    cfg = trainer.cfg
    lines = [f"model: {model.name_or_path} ({human(trainer.trainable.total_params())} parameters) on {trainer.device}",
             trainer.data.describe(cfg), f"method: {trainer.trainable.summary}", trainer.trainable.counts_line()]
    loss = "head on label tokens only, chunked" if loss_reason is None else f"model's own logits ({loss_reason})"
    checkpointing = "on" if cfg.gradient_checkpointing else "off"
    attention = getattr(model.config, "_attn_implementation", None) or "the model's default"
    if attention == CPU_ATTENTION:
        ways = ["per example in packed rows"] if trainer.data.packed else []
        ways += [f"in fp32 on rows of at most {FP32_UP_TO} tokens"] if trainer.amp_dtype is not None else []
        attention = f"SDPA, {' and '.join(ways)}"
    lines.append(f"precision: {PRECISIONS[trainer.amp_dtype]}; loss: {loss}; attention: {attention}; gradient "
                 f"checkpointing: {checkpointing}")
    epochs = f"{cfg.num_train_epochs:g} epochs x " if cfg.max_steps <= 0 else "max_steps; "
    batch = trainer.schedule.global_micro_batch
    batch = f"{batch} ({cfg.per_device_train_batch_size} per rank)" if trainer.world.distributed else batch
    lines.append(f"steps: {trainer.schedule.total_steps} = {epochs}{trainer.per_epoch} steps/epoch "
                 f"({trainer.n_batches} batches of {batch}, accumulation {cfg.gradient_accumulation_steps}); warmup "
                 f"{trainer.schedule.warmup_steps}; lr {cfg.learning_rate:g} {cfg.lr_scheduler_type}")
    if trainer.teacher_note:
        lines.append(trainer.teacher_note)
    if trainer.null_space_note:
        lines.append(trainer.null_space_note)
    if resume:
        lines.append(f"resuming from {resume} at step {trainer.step} (epoch {trainer.epoch_float:.2f}, "
                     f"{trainer.state.examples_consumed} {'rows' if trainer.data.packed else 'examples'} consumed)")
    if trainer.sharded is not None:
        lines += trainer.sharded.describe(cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps,
                                          len(trainer.lengths))
    return lines + [f"output: {cfg.output_dir}"]
