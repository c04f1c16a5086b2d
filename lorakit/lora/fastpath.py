"""The no-grad fast path of a LoRA linear, and the one autocast copy of an input that its projections share.

Neither changes a number; both only save work. Their invariants (tests/test_fast_paths.py checks each):

1. `plain_inference` computes exactly the training formula  y = W0 x + b + scaling * B (A x)  at the dtype it runs
   in. It applies only where that formula has no other term: gradients off, a plain `nn.Linear` base (not Conv1D,
   not quantized), a plain adapter (not DoRA, not AdaLoRA), no dropout that would act (identity, or the module in
   eval mode), x, W0 and the adapter in one dtype, autocast off (`applies` says so).
2. Nothing is cached between calls: the parameters are read at every call, so a weight changed in place,
   re-assigned, quantized or dequantized is seen at the next token.
3. `autocast_input(x, dtype)` returns one cast of x for all projections that read the same x (q, k, v read one
   normed hidden state; gate and up another) instead of one copy each; it keeps weak references only (no tensor
   or graph kept alive), and hands back its cast only for the same tensor object, at the same version counter
   (no in-place change since), in the same dtype, while something else still holds the cast.
"""

from __future__ import annotations

import threading
import weakref

import torch
import torch.nn.functional as F
from torch import nn


def applies(base: nn.Module, x: torch.Tensor, lora_a: torch.Tensor, dropout: nn.Module, variant: bool) -> bool:
    """True when `plain_inference` gives the training formula's numbers for this call (invariant 1); `variant`:
    the adapter has terms of its own (DoRA, AdaLoRA's E)."""
    if torch.is_grad_enabled() or variant or type(base) is not nn.Linear:
        return False
    if torch.is_autocast_enabled(x.device.type):
        return False
    if not isinstance(dropout, nn.Identity) and dropout.training:
        return False
    return x.dtype == base.weight.dtype == lora_a.dtype


def plain_inference(x: torch.Tensor, base: nn.Linear, lora_a: torch.Tensor, lora_b: torch.Tensor,
                    scaling: float) -> torch.Tensor:
    """W0 x + b, then scaling * B (A x) added into that new output in place by one fused multiply-add."""
    out_features = base.weight.shape[0]
    result = F.linear(x, base.weight, base.bias)  # (..., out), a new contiguous tensor
    h = F.linear(x, lora_a)  # (..., r)
    result.view(-1, out_features).addmm_(h.reshape(-1, h.shape[-1]), lora_b.t(), alpha=scaling)
    return result


_last_cast = threading.local()  # .entry = (weakref to x, weakref to its cast, x's version, dtype)


def autocast_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in `dtype`, cast once for every projection that reads this x (invariant 3). The gradient reaches x through
    the one cast; autocast alone would cast it anew for each projection, and each LoRA A would keep its own copy."""
    if x.dtype == dtype:
        return x
    if x.is_inference():  # no version counter to tell an in-place change; nothing kept for a backward anyway
        return x.to(dtype)
    entry = getattr(_last_cast, "entry", None)
    if entry is not None and entry[0]() is x and entry[2] == x._version and entry[3] == dtype:
        cast = entry[1]()  # alive while a graph holds it (LoRA A saves it for the backward); else cast anew
        if cast is not None:
            return cast
    cast = x.to(dtype)
    _last_cast.entry = (weakref.ref(x), weakref.ref(cast), x._version, dtype)
    return cast
