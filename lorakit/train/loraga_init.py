"""LoRA-GA's starting point for `lorakit train` (loraga_init: true): the gradient of every target layer, estimated on
the first `loraga_batches` micro-batches of a seeded order of the training data, with the base frozen and before any
adapter exists (lorakit.lora.loraga has the method and what it holds in memory)."""

from __future__ import annotations

import time

import torch
from torch import nn

from ..data import batch_order, collate_packed, pad_collate
from ..lora import GradientFactors, LoraConfig, gradient_factors
from .config import TrainConfig
from .loss import causal_lm_loss


def estimate_lora_ga(model: nn.Module, lora_config: LoraConfig, cfg: TrainConfig, items: list[dict], pad_id: int,
                     device: torch.device, amp_dtype: torch.dtype | None, packed: bool = False,
                     say=print) -> dict[str, GradientFactors]:
    """The LoRA-GA factors of every layer `lora_config` targets; says how long it took and what it held."""
    lengths = [len(it["input_ids"]) for it in items]
    order = batch_order(lengths, cfg.per_device_train_batch_size, cfg.seed, epoch=0)[:cfg.loraga_batches]
    if len(order) < cfg.loraga_batches:
        say(f"lorakit train: LoRA-GA: the data has {len(order)} batches, fewer than loraga_batches "
            f"{cfg.loraga_batches}; using them all")

    def step(indices: list[int]):
        def run() -> torch.Tensor:
            collate = collate_packed if packed else pad_collate
            batch = {k: v.to(device) for k, v in collate([items[i] for i in indices], pad_id).items()}
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss_sum, n = causal_lm_loss(model, batch)
            return loss_sum / max(n, 1)
        return run

    t0 = time.perf_counter()
    factors = gradient_factors(model, lora_config, [step(ix) for ix in order])
    held = sum(m.weight.numel() * 4 for key, m in model.named_modules() if key in factors)
    say(f"lorakit train: LoRA-GA: gradients of {len(factors)} layers from {len(order)} batches in "
        f"{time.perf_counter() - t0:.1f} s (held: {held / 2**20:,.0f} MiB of fp32 gradients"
        f"{' across batches' if len(order) > 1 else ', one layer at a time'}); A and B start on them, the base is "
        f"offset so step 0 is unchanged. LoRA-GA wants a learning rate "
        f"near full fine-tuning's, with use_rslora")
    return factors
