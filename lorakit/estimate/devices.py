"""Devices a run can be planned for: this machine's CPU (memory and matmul peak measured here), CUDA (the GPU that
is present), a named GPU (its datasheet figures) or a bare memory size ("24GB").

A GPU's peak is the datasheet's dense figure: bf16/fp16 tensor-core FLOP/s, and plain fp32 (PyTorch does not use
TF32 for fp32 matmuls unless asked). The fixed cost of a CUDA process (context, cuBLAS workspace) is outside what
`torch.cuda.max_memory_allocated` reports but inside the card's memory; `CUDA_CONTEXT_BYTES` is a typical figure,
not one measured here.
"""

from __future__ import annotations

import functools
import os
import re
import time
from dataclasses import dataclass

import torch

GIB = 2**30
CUDA_CONTEXT_BYTES = 600 * 2**20
# share of the matmul rate a training step reaches. CPU: of the rate of the run's own matmul shapes at its typical
# pass (`cpu_matmul_rate`), what lorakit reached on this machine's alpaca rows in bench/results/train.json (MFU fp32
# 60 %, bf16 40 %, where those shapes run at the large-GEMM peak); GPU: of the datasheet peak, an assumption for
# models of 1B parameters and more (a 135M model leaves an H200 launch-bound, far below it)
EFFICIENCY = {("cpu", "fp32"): 0.55, ("cpu", "bf16"): 0.40, ("cuda", "fp32"): 0.40, ("cuda", "bf16"): 0.40}
# a QLoRA step against a LoRA step on the same model: each matmul dequantizes its weight first (bench/results/
# qlora.json: 1.21x in fp32, 1.13x in bf16 on this CPU)
QUANTIZED_SLOWDOWN = 1.2


@dataclass(frozen=True)
class Device:
    """Where a run is planned for."""

    name: str
    kind: str
    """"cpu" or "cuda"."""
    memory_bytes: int
    peak_flops: dict
    """{"fp32": FLOP/s, "bf16": FLOP/s}; empty when unknown (a bare memory size)."""
    source: str
    """Where the figures come from."""
    measured_here: bool = False
    """This process's own CPU: matmul rates can be timed at a run's shapes (`cpu_matmul_rate`)."""

    def efficiency(self, precision: str) -> float:
        return EFFICIENCY[(self.kind, precision)]


# name: (memory GiB, fp32 TFLOP/s, bf16 dense TFLOP/s or None); NVIDIA datasheets
GPUS = {
    "H200": (141 * 10**9 / GIB, 67.0, 989.0), "H100": (80, 67.0, 989.0), "H100 PCIe": (80, 51.0, 756.0),
    "A100": (80, 19.5, 312.0), "A100 40GB": (40, 19.5, 312.0), "L40S": (48, 91.6, 362.0),
    "A10": (24, 31.2, 125.0), "L4": (24, 30.3, 121.0), "RTX 4090": (24, 82.6, 165.2),
    "RTX 3090": (24, 35.6, 71.0), "V100": (32, 15.7, None), "T4": (16, 8.1, None),
}


def gpu(name: str) -> Device:
    """A named GPU from the datasheet table (case and spaces ignored: "a100", "rtx4090")."""
    key = {k.lower().replace(" ", ""): k for k in GPUS}.get(name.lower().replace(" ", "").replace("nvidia", ""))
    if key is None:
        raise ValueError(f"unknown device {name!r}: use cpu, cuda, a memory size such as 24GB, or one of "
                         f"{', '.join(GPUS)}")
    memory, fp32, bf16 = GPUS[key]
    peaks = {"fp32": fp32 * 1e12, **({"bf16": bf16 * 1e12} if bf16 else {})}
    return Device(key, "cuda", int(memory * GIB), peaks, f"{key} datasheet (dense peaks)")


def memory_size(text: str) -> Device | None:
    """"24GB", "24 GiB", "80g" -> a GPU with that much memory and no known peak; None when `text` is not a size."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(g|gb|gib)\s*", text.lower())
    if not match:
        return None
    size = float(match.group(1))
    return Device(f"{size:g} GB GPU", "cuda", int(size * GIB), {}, "memory size given; no FLOP peak known")


def this_cpu() -> Device:
    """This machine's CPU: its physical memory and the matmul peak measured now (`cpu_gemm_peak`)."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    from ..device import bf16_supported

    peaks = {"fp32": cpu_gemm_peak(torch.float32)}
    if bf16_supported(torch.device("cpu")):
        peaks["bf16"] = cpu_gemm_peak(torch.bfloat16)
    return Device(f"this CPU ({os.cpu_count()} cores)", "cpu", memory, peaks,
                  f"physical memory; GEMM peak measured now on {torch.get_num_threads()} threads", measured_here=True)


@functools.cache
def cpu_gemm_peak(dtype: torch.dtype, n: int = 1024, seconds: float = 0.25) -> float:
    """FLOP/s of the best of repeated (n x n) @ (n x n) matmuls on this CPU in `dtype`."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # warm-up (oneDNN compiles a bf16 kernel on first use)
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


TIMED_UP_TO = 2048  # cpu_matmul_rate times at most 1024 rows and 2048 x 2048 weights


def cpu_matmul_rate(dtype: torch.dtype, rows: int, shapes: tuple[tuple[int, int, int], ...],
                    seconds: float = 0.03) -> float:
    """FLOP/s of a pass's matmuls on this CPU in `dtype`: `rows` tokens through every (in, out, count) linear
    shape, each timed as (rows x in) @ (in x out) (best of repeats for `seconds`; dimensions capped at TIMED_UP_TO),
    their FLOPs over their summed times. A few hundred tokens per pass run these shapes below the large-GEMM peak."""
    flops = total = 0.0
    for fan_in, fan_out, count in shapes:
        # a dimension past TIMED_UP_TO runs at the rate of its capped size (large matmuls are at the peak already):
        # timing a 70B model's real shapes would take a minute and gigabytes
        m, k, n = min(rows, TIMED_UP_TO // 2), min(fan_in, TIMED_UP_TO), min(fan_out, TIMED_UP_TO)
        flops += count * 2 * m * k * n
        total += count * _matmul_seconds(dtype, m, k, n, seconds)
    return flops / total if total else 0.0


@functools.cache
def _matmul_seconds(dtype: torch.dtype, m: int, k: int, n: int, seconds: float) -> float:
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    a @ b  # warm-up (oneDNN compiles a kernel for a new shape)
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return best


def this_cuda() -> Device:
    """The CUDA device present: its memory, and its datasheet peak when the name is in the table."""
    props = torch.cuda.get_device_properties(0)
    known = next((k for k in sorted(GPUS, key=len, reverse=True) if k.lower() in props.name.lower()), None)
    peaks = gpu(known).peak_flops if known else {}
    return Device(props.name, "cuda", props.total_memory, peaks,
                  f"{known} datasheet" if known else "memory from the driver; peak unknown")


def find_device(text: str | None) -> Device:
    """`--device`: cpu, cuda, a memory size (24GB), or a GPU name; empty: CUDA when present, else this CPU."""
    text = (text or "").strip()
    if not text:
        return this_cuda() if torch.cuda.is_available() else this_cpu()
    if text.lower() == "cpu":
        return this_cpu()
    if text.lower().startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device here; name a GPU (A100, RTX 4090, ...) or a size (24GB)")
        return this_cuda()
    return memory_size(text) or gpu(text)
