"""The one table of dtype names a setting may use (compute_dtype, infer_dtype, export_dtype, ...): PyTorch's names
and the short ones LLaMA-Factory and the HF Trainer use."""

from __future__ import annotations

import torch

DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
               "float16": torch.float16, "fp16": torch.float16}


def dtype_named(name: str) -> torch.dtype:
    """The torch dtype called `name` ("bf16", "bfloat16", ...); ValueError listing the names otherwise."""
    key = str(name).strip().lower()
    if key not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {name!r}")
    return DTYPE_NAMES[key]


def canonical_name(name: str) -> str:
    """PyTorch's own name for a dtype name: "bf16" -> "bfloat16"; other text (such as "auto") is returned as is."""
    dtype = DTYPE_NAMES.get(str(name).strip().lower())
    return str(dtype).removeprefix("torch.") if dtype is not None else name
