"""Which device to run on, and which autocast precision that device really supports.

bf16 autocast on a CPU without native bf16 instructions (AVX-512-BF16 or AMX) is emulated and several times
slower than fp32, so it is only chosen where the hardware has it; otherwise lorakit warns and stays in fp32.
"""

from __future__ import annotations

import functools
import platform
import warnings
from collections.abc import Callable
from pathlib import Path

import torch


def pick_device(name: str | None = None) -> torch.device:
    """`name` if given ("cpu", "cuda", "cuda:1", "mps"), else CUDA when present, else CPU."""
    if name:
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but CUDA is not available on this machine")
        return device
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """CPU feature flags from /proc/cpuinfo (Linux); empty elsewhere."""
    info = Path("/proc/cpuinfo")
    if not info.is_file():
        return frozenset()
    for line in info.read_text().splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def bf16_supported(device: torch.device) -> bool:
    """True where bf16 matmuls run natively: CUDA with bf16, CPUs with AVX-512-BF16 / AMX, Apple silicon."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "mps":
        return True
    if platform.machine() in ("arm64", "aarch64"):
        return "bf16" in cpu_flags() or platform.system() == "Darwin"
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def autocast_dtype(device: torch.device, bf16: bool, fp16: bool) -> torch.dtype | None:
    """The autocast dtype for the requested precision, or None (fp32) with a warning when unsupported."""
    if bf16 and fp16:
        raise ValueError("bf16 and fp16 are both true; choose one")
    if bf16:
        if bf16_supported(device):
            return torch.bfloat16
        warnings.warn(f"bf16 requested but this {device.type} has no native bf16 support "
                      f"(no AVX-512-BF16/AMX); training in fp32 instead", stacklevel=2)
        return None
    if fp16:
        if device.type == "cuda":
            return torch.float16
        warnings.warn(f"fp16 autocast is only used on CUDA; training in fp32 on {device.type}", stacklevel=2)
    return None


# On a CPU, bf16/fp16 matmuls run through oneDNN, which compiles kernels for every new matrix shape and keeps them
# in a cache of up to 1,024 primitives. Micro-batches whose token counts all differ compiled ~25 new ones each; on
# SmolLM2-135M with alpaca's packed rows that cost ~75-130 MB of resident memory per optimizer step, growing until
# the cache filled. Rounding token counts up to a few sizes per power of two keeps the shapes few.
def bucket_size(n: int) -> int:
    """n rounded up to one of 8 sizes per power of two, at most 1/8 more: 36 -> 36, 300 -> 320, 505 -> 512;
    n <= 16 unchanged."""
    if n <= 16:
        return n
    step = 1 << (n.bit_length() - 4)  # n in [2^k, 2^(k+1)) -> a multiple of 2^(k-3)
    return -(-n // step) * step


def shape_bucket(device: torch.device | str, dtype: torch.dtype | None) -> Callable[[int], int] | None:
    """`bucket_size` where matmuls run in bf16/fp16 on a CPU (`dtype`: the autocast or model dtype), else None:
    what to round a batch's token count, or a chunk's row count, up to."""
    half = dtype in (torch.bfloat16, torch.float16)
    return bucket_size if torch.device(device).type == "cpu" and half else None
