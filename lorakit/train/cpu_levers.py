"""What the training loop does differently on a CPU (and under autocast) to run faster with the same numbers.

    shape buckets         where bf16/fp16 matmuls run on a CPU, a batch's token count is rounded up to one of a
                          few sizes (`lorakit.device.bucket_size`): oneDNN compiles and keeps kernels for every new
                          matrix shape
    pieces of rows        on a CPU a micro-batch of more than CPU_SPLIT_ABOVE tokens runs as consecutive pieces of
                          rows of about CPU_PIECE_TOKENS tokens (`row_pieces`): the same summed gradient, better
                          cache use
    frozen base storage   under autocast the frozen base weights of LoRA layers are stored in the autocast dtype
                          (`precision.store_frozen_base`): the matmuls cast them anyway
    CPU attention         packed rows attend example by example on a CPU, and under autocast short rows attend in
                          fp32 (`attention.use_cpu_attention`)

Each lever leaves the loss and the gradient as they were, up to rounding (fp32 attention rounds less than bf16;
tests/test_fast_paths.py); what each is worth is measured in bench/bench_levers.py and bench/bench_train.py and
quoted in the README, not here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..device import shape_bucket
from .attention import use_cpu_attention
from .precision import store_frozen_base

CPU_SPLIT_ABOVE = 1024  # tokens (rows x width) above which a micro-batch runs in pieces on a CPU
CPU_PIECE_TOKENS = 512  # about this many tokens per piece


def token_rounding(device: torch.device, dtype: torch.dtype) -> Callable[[int], int] | None:
    """What to round a batch's token count up to (`dtype`: the autocast or model dtype): shape buckets where
    half-precision matmuls run on a CPU, else None."""
    return shape_bucket(device, dtype)


def row_pieces(batch: dict, device: torch.device, round_width: Callable[[int], int] | None,
               split_above: int = CPU_SPLIT_ABOVE, piece_tokens: int = CPU_PIECE_TOKENS) -> list[dict]:
    """The micro-batch as one forward pass, or on a CPU, when it holds more than `split_above` tokens, as
    consecutive rows in balanced pieces of about `piece_tokens` tokens, the padding columns no row of a piece uses
    trimmed off (then rounded up again by `round_width`). The gradient is the same sum over the same label tokens:
    the loss is summed, then divided by the step's label count."""
    rows, width = batch["input_ids"].shape
    if device.type != "cpu" or rows * width <= split_above or rows == 1:
        return [batch]
    n_pieces = min(rows, math.ceil(rows * width / piece_tokens))
    per_piece = math.ceil(rows / n_pieces)
    out = []
    for start in range(0, rows, per_piece):
        piece = {k: v[start:start + per_piece] for k, v in batch.items()}  # (per_piece, width)
        if "attention_mask" in piece:  # right padding: drop the columns past this piece's longest row
            used = int(piece["attention_mask"].sum(dim=1).max())
            used = round_width(used) if round_width else used
            piece = {k: v[:, :max(used, 1)] for k, v in piece.items()}  # (per_piece, used)
        out.append(piece)
    return out


@dataclass(frozen=True)
class ModelLevers:
    """What `apply_model_levers` switched on."""

    cpu_attention: bool  # attention.cpu_sdpa_attention: packed rows per example, short rows in fp32 under autocast
    frozen_base_params: int  # frozen base weights now stored in the autocast dtype


def apply_model_levers(model: torch.nn.Module, amp_dtype: torch.dtype | None, packed: bool,
                       lora: bool) -> ModelLevers:
    """Switch the model's levers on, once, after the fp32 checks of start-up (from here on every training forward
    runs under the autocast of `amp_dtype`): lorakit's CPU attention for packed rows or under autocast; the frozen
    base in the autocast dtype for LoRA."""
    cpu_attention = use_cpu_attention(model) if packed or amp_dtype is not None else False
    stored = store_frozen_base(model, amp_dtype) if amp_dtype is not None and lora else 0
    return ModelLevers(cpu_attention, stored)
