"""QuantLinear: a frozen linear layer stored in 4 bits (NF4 or FP4, optionally double-quantized) or 8 bits, in
plain torch, so it runs on any device and any shape.

4-bit, as in QLoRA (Dettmers et al. 2023, section 3): the weight is cut into blocks of 64 values, each block is
divided by its absmax, and every value is stored as the 4-bit index of the nearest of 16 levels: NF4's levels are
quantiles of N(0, 1) (pretrained weights are about normal), FP4's are a 1-2-1 float grid; two indices per byte.
Double quantization (section 3, "Double Quantization") stores the fp32 absmax constants themselves in 8 bits:
their mean is subtracted and each group of 256 is scaled by its own absmax, which takes the constants from
32/64 = 0.5 to 8/64 + 32/(64*256) = 0.127 bits per weight. The level tables are bitsandbytes', so a weight
quantized here dequantizes to the values bitsandbytes' Linear4bit would give for the same blocks.

8-bit: one scale per output row (absmax / 127), int8 values (LLM.int8's vector-wise quantization without the
outlier split).

The forward pass dequantizes the weight into the compute dtype, multiplies, and lets the dense copy go; backward
dequantizes again instead of keeping it (`_QuantMatmul`), so training holds the 4-bit weights plus one layer's
dense weight at a time. The weight gets no gradient: QLoRA trains adapters on a frozen base.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BLOCK = 64  # weights per absmax (QLoRA's block size)
SCALER_BLOCK = 256  # absmax constants per second-level scale (double quantization)

NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)
FP4_LEVELS = (0.0, 0.0052083333, 0.6666666667, 1.0, 0.3333333333, 0.5, 0.1666666667, 0.25,
              -0.0, -0.0052083333, -0.6666666667, -1.0, -0.3333333333, -0.5, -0.1666666667, -0.25)
LEVELS = {"nf4": NF4_LEVELS, "fp4": FP4_LEVELS}


def nearest_level(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index (uint8) into `levels` of the level nearest each value of x, in O(n log 16) memory-light steps."""
    order = torch.argsort(levels)
    ranked = levels[order]
    midpoints = (ranked[1:] + ranked[:-1]) / 2
    return order[torch.bucketize(x, midpoints)].to(torch.uint8)


def quantize_blocks(flat: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes (n/2,) uint8 with two 4-bit indices per byte, absmax (n/64,) fp32) for a flat fp32 tensor, n % 64 == 0."""
    blocks = flat.view(-1, BLOCK)  # (n_blocks, 64)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    scaled = blocks / absmax.clamp(min=torch.finfo(torch.float32).tiny)[:, None]
    index = nearest_level(scaled.reshape(-1), levels)  # (n,)
    return index[0::2] << 4 | index[1::2], absmax


def quantize_scalers(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization: (int8 code per absmax, fp32 scale per group of 256, fp32 mean)."""
    mean = absmax.mean()
    n = absmax.numel()
    centred = F.pad(absmax - mean, (0, -n % SCALER_BLOCK)).view(-1, SCALER_BLOCK)  # (n_groups, 256)
    scale = (centred.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)  # (n_groups,)
    codes = torch.round(centred / scale[:, None]).clamp(-127, 127).to(torch.int8).view(-1)[:n]
    return codes, scale, mean


_PAIRS: dict[tuple, torch.Tensor] = {}


def pair_table(quant_type: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(256, 2): byte -> its two levels (high nibble first), so dequantizing is one gather; one per device/dtype."""
    key = (quant_type, device, dtype)
    if key not in _PAIRS:
        levels = torch.tensor(LEVELS[quant_type], dtype=torch.float32)
        pairs = torch.stack(torch.meshgrid(levels, levels, indexing="ij"), dim=-1).reshape(256, 2)
        _PAIRS[key] = pairs.to(device=device, dtype=dtype)
    return _PAIRS[key]


class QuantLinear(nn.Module):
    """y = x W^T + b with W stored quantized (see the module docstring); W is frozen.

    `weight` is the packed storage (as for bitsandbytes' Linear4bit), so code that asks a layer for its device
    or `weight.dtype` keeps working; `dequantize_weight()` gives the dense (out, in) matrix.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, bits: int = 4,
                 quant_type: str = "nf4", double_quant: bool = True, compute_dtype: torch.dtype | None = None):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"QuantLinear: bits must be 4 or 8, got {bits}")
        if bits == 4 and quant_type not in LEVELS:
            raise ValueError(f"QuantLinear: quant_type must be nf4 or fp4, got {quant_type!r}")
        self.out_features, self.in_features = weight.shape
        self.bits, self.quant_type, self.double_quant = bits, quant_type, double_quant and bits == 4
        self.compute_dtype = compute_dtype
        self.dtype = weight.dtype  # the original dtype: what dequantize_weight() returns by default
        w = weight.detach().float()
        if bits == 8:
            scale = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)  # (out,)
            self.register_buffer("codes", torch.round(w / scale[:, None]).to(torch.int8))  # (out, in)
            self.register_buffer("scale", scale)
        else:
            self._quantize_4bit(w)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def _quantize_4bit(self, w: torch.Tensor) -> None:
        levels = torch.tensor(LEVELS[self.quant_type], device=w.device)
        flat = F.pad(w.reshape(-1), (0, -w.numel() % BLOCK))  # zeros pad the last block
        codes, absmax = quantize_blocks(flat, levels)
        self.register_buffer("codes", codes)
        if self.double_quant:
            absmax_codes, absmax_scale, absmax_mean = quantize_scalers(absmax)
            self.register_buffer("absmax_codes", absmax_codes)
            self.register_buffer("absmax_scale", absmax_scale)
            self.register_buffer("absmax_mean", absmax_mean)
        else:
            self.register_buffer("absmax", absmax)

    @property
    def weight(self) -> torch.Tensor:
        return self.codes

    def _absmax(self) -> torch.Tensor:
        if not self.double_quant:
            return self.absmax
        n_blocks = self.absmax_codes.numel()
        codes = F.pad(self.absmax_codes.float(), (0, -n_blocks % SCALER_BLOCK)).view(-1, SCALER_BLOCK)
        groups = codes * self.absmax_scale[:, None]  # (n_groups, 256)
        return groups.view(-1)[:n_blocks] + self.absmax_mean  # (n_blocks,)

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight (out, in) in `dtype` (default: the dtype it had before quantization)."""
        dtype = dtype or self.dtype
        if self.bits == 8:
            return self.codes.to(dtype) * self.scale.to(dtype)[:, None]
        n = self.out_features * self.in_features
        pairs = pair_table(self.quant_type, self.codes.device, dtype)
        values = F.embedding(self.codes.view(-1, BLOCK // 2).int(), pairs)  # (n_blocks, 32, 2)
        blocks = values.view(-1, BLOCK).mul_(self._absmax().to(dtype)[:, None])  # (n_blocks, 64), no second copy
        return blocks.view(-1)[:n].view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        dtype = self.compute_dtype or (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                                       else x.dtype)
        with torch.autocast(device, enabled=False):
            y = _QuantMatmul.apply(x.to(dtype), self)  # (..., out)
            return y if self.bias is None else y + self.bias.to(dtype)

    def extra_repr(self) -> str:
        kind = "int8" if self.bits == 8 else self.quant_type + (" double-quant" if self.double_quant else "")
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}, bias={self.bias is not None}"


class _QuantMatmul(torch.autograd.Function):
    """x W^T with W dequantized in forward and again in backward: the dense W is never saved for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantize_weight(x.dtype))  # (..., out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.layer.dequantize_weight(grad.dtype), None  # (..., in); no gradient for the frozen W
