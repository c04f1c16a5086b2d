"""Attention in training on a CPU: packed rows one example at a time, and short rows in fp32.

A packed row holds several examples back to back (position ids restart at 0 at each). transformers gives SDPA
a (B, 1, T, T) block-diagonal causal mask for it, and a masked SDPA kernel computes every one of the T x T
scores, then throws most away: on a 512-token row of eight 64-token examples that is 8x the attention work. Here
each example's span goes through SDPA on its own with `is_causal=True`, so the work is sum(len_i^2) / 2, and the
kernel runs causal and unmasked (what it is worth: bench/bench_levers.py, the README's levers table).

Under bf16 autocast, the CPU's SDPA kernels are slower in bf16 than in fp32 on short rows (its backward most):
a padded batch whose keys are at most FP32_UP_TO long, and every span of a packed row, runs SDPA in fp32 with
autocast off and returns the autocast dtype, as transformers' SDPA does under autocast. The scores are then summed
in fp32 instead of bf16: the same attention, rounded less (what it is worth: bench/bench_levers.py).

The spans come from the batch, not from the mask: `causal_lm_loss` computes them once per forward from the
position ids of a packed batch (`mark_packed`) and attaches them to that position-ids tensor, which transformers
hands to every attention call, also when gradient checkpointing recomputes a layer. Any other call, or a model or
layer this does not fit (a cache, a sliding window, a soft cap, a position bias), goes to transformers' own SDPA
with the mask it built, so the answer is the same either way; only the speed differs.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

NAME = "lorakit_cpu_sdpa"
FP32_UP_TO = 256  # keys per row up to which a padded batch's attention runs in fp32 under autocast on a CPU
_TAG = "_lorakit_packed_spans"


def packed_spans(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the (start, end) of each example: a new one starts wherever the position id is 0."""
    spans = []
    for row in position_ids.detach().cpu().tolist():
        starts = [i for i, p in enumerate(row) if p == 0] or [0]
        if starts[0] != 0:
            starts.insert(0, 0)
        spans.append(list(zip(starts, starts[1:] + [len(row)])))
    return spans


def mark_packed(position_ids: torch.Tensor) -> None:
    """Declare `position_ids` (B, T) to be a packed batch's: attention of a model switched by
    `use_cpu_attention` then runs example by example wherever it is given this tensor."""
    setattr(position_ids, _TAG, (position_ids._version, packed_spans(position_ids)))


def _marked_spans(position_ids: torch.Tensor | None) -> list[list[tuple[int, int]]] | None:
    tag = getattr(position_ids, _TAG, None)
    if tag is None or tag[0] != position_ids._version:  # unmarked, or changed in place since
        return None
    return tag[1]


def _sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def cpu_sdpa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query (B, H, T, D), key/value (B, Hkv, S, D) -> ((B, T, H, D), None)."""
    position_ids = kwargs.get("position_ids")
    spans = _marked_spans(position_ids)
    plain = (spans is None or position_ids.shape[-1] != query.shape[2] or key.shape[2] != query.shape[2]
             or len(spans) != query.shape[0] or kwargs.get("softcap") is not None
             or kwargs.get("position_bias") is not None or kwargs.get("sliding_window") is not None
             or getattr(module, "sliding_window", None) is not None)
    device = query.device.type
    autocast = torch.is_autocast_enabled(device)
    dtype = torch.get_autocast_dtype(device) if autocast else query.dtype  # what transformers' SDPA returns
    half = device == "cpu" and (autocast or dtype in (torch.bfloat16, torch.float16))
    if plain and not (half and key.shape[2] <= FP32_UP_TO):
        return _sdpa()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                       is_causal=is_causal, **kwargs)
    if half:
        # in bf16 each new span length also compiles new oneDNN kernels for the backward, which oneDNN's cache then
        # keeps (RSS grew without bound); under autocast q and k arrive in fp32 (the rotary cos/sin are fp32) and v
        # in bf16
        query, key, value = query.float(), key.float(), value.float()
    # autocast lists SDPA among its bf16 ops: left on, it would cast the fp32 tensors straight back
    with torch.autocast(device, enabled=False) if half else contextlib.nullcontext():
        if plain:  # a padded batch, short: transformers' SDPA with its mask, in fp32
            mask = attention_mask.float() if attention_mask is not None and attention_mask.is_floating_point() \
                else attention_mask
            out, _ = _sdpa()(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                             is_causal=is_causal, **kwargs)  # (B, T, H, D)
            return out.to(dtype), None
        # grouped key/value heads stay grouped (SDPA's enable_gqa): repeating them to every query head, as
        # transformers' repeat_kv does, would keep fp32 copies of k and v per query head for the backward
        gqa = key.shape[1] != query.shape[1]
        rows = [_row_attention(query, key, value, b, row_spans, dropout, scaling, gqa)
                for b, row_spans in enumerate(spans)]
    out = torch.cat(rows) if len(rows) > 1 else rows[0]  # (B, H, T, D)
    return out.transpose(1, 2).to(dtype).contiguous(), None


def _row_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, b: int,
                   spans: list[tuple[int, int]], dropout: float, scaling: float | None, gqa: bool) -> torch.Tensor:
    """Row b's examples, each causal over its own span: (1, H, T, D)."""
    pieces = [F.scaled_dot_product_attention(query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e],
                                             dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa)
              for s, e in spans]  # each (1, H, len, D)
    return torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0]


def use_cpu_attention(model: nn.Module) -> bool:
    """Switch a model on a CPU that runs transformers' SDPA to `cpu_sdpa_attention` (packed rows example by
    example; short rows in fp32 under autocast); False (nothing changed) for other attention implementations, a
    model on a GPU, or a transformers without the registries."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) not in ("sdpa", NAME):
        return False
    weight = next(model.parameters(), None)
    if weight is not None and weight.device.type != "cpu":
        # on a GPU the loop of per-example SDPA calls, each a new shape, lost to one masked call per row (the README,
        # "On a GPU"); GPUs keep transformers' SDPA (flash-attention varlen is the route there)
        return False
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
    except ImportError:
        return False
    if NAME not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionInterface.register(NAME, cpu_sdpa_attention)
        AttentionMaskInterface.register(NAME, sdpa_mask)
    for module in model.modules():  # the top config and any sub-config a layer holds
        sub = getattr(module, "config", None)
        if sub is not None and getattr(sub, "_attn_implementation", None) == "sdpa":
            sub._attn_implementation = NAME
    return True
