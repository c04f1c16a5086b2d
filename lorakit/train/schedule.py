"""The learning-rate schedule as one pure function of the optimizer step (nanoGPT's `get_lr`).

Step `s` (0-based) is trained with `get_lr(s, ...)`. Warmup rises linearly from 0 (step 0 uses lr 0, as in
transformers' schedulers, so a LLaMA-Factory run and a lorakit run see the same learning rates), then:

    linear     lr * (total - s) / (total - warmup)
    cosine     lr * 0.5 * (1 + cos(pi * (s - warmup) / (total - warmup)))
    constant   lr          (constant_with_warmup is the same; both honour the warmup)
"""

from __future__ import annotations

import math


def warmup_steps_for(total_steps: int, warmup_steps: int = 0, warmup_ratio: float = 0.0) -> int:
    """warmup_steps when above 0, else ceil(warmup_ratio * total_steps), as transformers does."""
    return warmup_steps if warmup_steps > 0 else math.ceil(warmup_ratio * total_steps)


def get_lr(step: int, base_lr: float, total_steps: int, warmup_steps: int = 0, kind: str = "linear") -> float:
    """The learning rate of optimizer step `step` (0-based) out of `total_steps`."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    if kind in ("constant", "constant_with_warmup"):
        return base_lr
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if kind == "linear":
        return base_lr * (1.0 - progress)
    if kind == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr_scheduler_type {kind!r}; use linear, cosine or constant")
