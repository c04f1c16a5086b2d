"""Precision levers of the training loop that keep the numbers autocast gives.

bf16 autocast is chosen in `lorakit.device.autocast_dtype` (only where the hardware runs bf16 natively); under it,
the frozen base weights of a LoRA model can be stored in bf16 outright (`store_frozen_base`).
"""

from __future__ import annotations

import torch

from ..lora.layers import LoraLinear


def store_frozen_base(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Keep the frozen fp32 base weights of LoRA-wrapped nn.Linears in `dtype` (bf16/fp16); returns how many.

    Under autocast every matmul casts these weights to the autocast dtype on each forward anyway, so storing them
    cast gives the same numbers, half the weight memory, and no cast per micro-batch. Only for LoRA training
    (frozen weights are never saved) and only while every forward runs under autocast; DoRA layers keep fp32,
    since their weight norm is computed outside the autocast matmuls.
    """
    count = 0
    for module in model.modules():
        if not isinstance(module, LoraLinear) or len(module.lora_magnitude_vector) or module.merged:
            continue
        base = module.base_layer
        if type(base) is torch.nn.Linear and base.weight.dtype == torch.float32 and not base.weight.requires_grad:
            count += base.weight.numel()
            base.to(dtype)
    if count:
        _off_the_file(model)
    return count


def _off_the_file(model: torch.nn.Module) -> None:
    """Copy the tensors left in their dtype into memory of their own. transformers maps the checkpoint file
    and its tensors point into that map: while one of them (the embedding, say) lives, the pages the fp32 weights
    just converted had occupied stay resident (bench/bench_qlora.py measures the RSS)."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.device.type == "cpu" and tensor.dtype == torch.float32 and not tensor.requires_grad:
                tensor.data = tensor.data.clone()
