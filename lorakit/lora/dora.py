"""DoRA (Liu et al. 2024): the LoRA variant that learns a magnitude per output row.

    W' = m * (W0 + s B A) / ||W0 + s B A||        norm per output row, m (out,) trainable, s = scaling

The norm is detached from the graph (the paper's section 4.3, and PEFT): it costs no backward memory. It is
computed in fp32 with autocast off, so under bf16 autocast the scale m / ||W0 + s B A|| is exactly 1 at step 0
(m starts as that norm) and a merged layer equals the unmerged one to fp32 rounding. The forward, in PEFT's form:

    y = W0 x + b + (m / n - 1) * W0 x + (m / n) * s * B A x,      n = ||W0 + s B A||

Only these functions differ from plain LoRA; the layer calls them for adapters that have a magnitude vector.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def weight_norm(layer: nn.Module, name: str) -> torch.Tensor:
    """||W0 + s B A|| per output row (out,), fp32, autocast off, outside the graph."""
    device = layer.lora_A[name].weight.device.type
    with torch.no_grad(), torch.autocast(device, enabled=False):
        combined = layer.oriented_weight() + layer.oriented_delta(name)  # (out, in) fp32
        return combined.norm(p=2, dim=1)


def reset_magnitude(layer: nn.Module, name: str) -> None:
    """m = ||W0 + s B A||, so DoRA starts exactly at the LoRA model."""
    with torch.no_grad():
        layer.lora_magnitude_vector[name].weight.copy_(weight_norm(layer, name))


def forward(layer: nn.Module, name: str, x: torch.Tensor, result: torch.Tensor, reuse_base: bool) -> torch.Tensor:
    """`result` (the base output W0 x + b) plus DoRA's terms; x is the LoRA branch input (after dropout).

    With no dropout the base output is reused for W0 x (minus the bias); with dropout, W0 is applied to the dropped
    input, as PEFT does, so both terms see the same x."""
    scaling = layer.scaling[name]
    lora_out = layer.lora_B[name](layer.lora_A[name](x))  # (..., out)
    scale = layer.lora_magnitude_vector[name].weight / weight_norm(layer, name)  # (out,) fp32
    bias = getattr(layer.base_layer, "bias", None)
    if reuse_base:
        base_out = result if bias is None else result - bias
    else:
        w = layer.oriented_weight()  # (out, in) fp32
        base_out = F.linear(x.to(w.dtype), w)  # (..., out)
    dora = (scale - 1) * base_out.to(scale.dtype) + scale * lora_out * scaling
    return result + dora.to(result.dtype)


def merge_factor(layer: nn.Module, name: str, combined: torch.Tensor) -> torch.Tensor:
    """m / ||W0 + s B A|| (out,) for a merge; `combined` is W0 + s B A in the base weight's layout, fp32."""
    norm = combined.norm(p=2, dim=0 if layer.fan_in_fan_out else 1)
    return layer.lora_magnitude_vector[name].weight.detach().float() / norm
