"""`lorakit estimate` against measured training runs: predicted peak memory vs the measured peak RSS of real
`lorakit train` processes on this machine, plus the process's fixed cost (python + torch + transformers).

Each row is one `python -m lorakit train ... max_steps=N` process on the embedded default model (SmolLM2-135M)
over a synthetic alpaca file whose every example is longer than the largest cutoff_len (so every micro-batch is
batch x cutoff_len tokens and the worst batch is every batch). Its peak RSS is the child's own `ru_maxrss`
(os.wait4). The prediction is `lorakit.estimate.estimate()` for the same keys, made from the model's config on the
meta device. Rows are measured once and kept in bench/results/estimate.json; `--compare` only re-predicts.

    python bench/validate_estimate.py [--only NAME,NAME] [--compare] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

NAME = "estimate"
RESULT = common.RESULTS_DIR / f"{NAME}.json"
TOLERANCE = 0.15  # |predicted / measured - 1| a row must stay within
BASE = {"per_device_train_batch_size": 2, "lora_rank": 8, "learning_rate": 1e-4, "save_steps": 100000,
        "logging_steps": 1, "report_to": "none"}
ROWS = [  # name, keys on top of BASE
    ("lora-fp32-c256", {"finetuning_type": "lora", "cutoff_len": 256}),
    ("lora-fp32-c512", {"finetuning_type": "lora", "cutoff_len": 512}),
    ("lora-r64-fp32-c512", {"finetuning_type": "lora", "cutoff_len": 512, "lora_rank": 64}),
    ("lora-bf16-c512", {"finetuning_type": "lora", "cutoff_len": 512, "bf16": True}),
    ("lora-fp32-c512-gc", {"finetuning_type": "lora", "cutoff_len": 512, "gradient_checkpointing": True}),
    ("lora-bf16-c1024-b1-gc", {"finetuning_type": "lora", "cutoff_len": 1024, "per_device_train_batch_size": 1,
                               "bf16": True, "gradient_checkpointing": True}),
    ("qlora-fp32-c512", {"finetuning_type": "qlora", "cutoff_len": 512}),
    ("qlora-bf16-c512", {"finetuning_type": "qlora", "cutoff_len": 512, "bf16": True}),
    ("full-fp32-c256", {"finetuning_type": "full", "cutoff_len": 256}),
    ("full-bf16-c256", {"finetuning_type": "full", "cutoff_len": 256, "bf16": True}),
    ("freeze-fp32-c512", {"finetuning_type": "freeze", "cutoff_len": 512}),
    ("lora-fp32-c512-b4", {"finetuning_type": "lora", "cutoff_len": 512, "per_device_train_batch_size": 4}),
]
WORDS = ("the ship reports depth sonar hull buoy current tide vessel signal marine instrument calibrate sensor "
         "harbour engineer captain survey chart anchor deck pressure salinity wave compass station").split()


def long_records(path: Path, n: int = 24, words: int = 1400, seed: int = 0) -> Path:
    """`n` alpaca records whose outputs are `words` words long (more tokens than any cutoff_len used here)."""
    rng = random.Random(seed)
    records = [{"instruction": f"Write survey log number {i}.", "input": "",
                "output": " ".join(rng.choice(WORDS) for _ in range(words))} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def row_keys(keys: dict, data: Path, out: Path, steps: int) -> dict:
    return {**BASE, **keys, "dataset": str(data), "output_dir": str(out), "max_steps": steps,
            "overwrite_output_dir": True}


def measure_row(keys: dict) -> dict:
    """Run `lorakit train` with `keys` in a child process; its peak RSS (MB) and wall time."""
    cmd = [sys.executable, "-m", "lorakit", "train"] + [f"{k}={json.dumps(v) if isinstance(v, bool) else v}"
                                                       for k, v in keys.items()]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, cwd=common.ROOT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        log.seek(0)
        tail = log.read().decode(errors="replace").strip().splitlines()[-3:]
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        return {"error": " | ".join(tail)}
    results = json.loads((Path(keys["output_dir"]) / "train_results.json").read_text())
    return {"peak_rss_mb": usage.ru_maxrss / 1024, "seconds": round(seconds, 1),
            "tokens_per_s": results.get("train_tokens_per_second")}


def fixed_cost_mb() -> float:
    """Resident MB of a fresh python after importing torch, transformers' Llama and lorakit's trainer."""
    code = ("import torch, transformers\nfrom transformers import LlamaForCausalLM\nimport lorakit.train\n"
            "print([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=common.ROOT, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def predict(keys: dict) -> dict:
    from lorakit.estimate import estimate_for_keys

    est = estimate_for_keys(keys, device="cpu")
    return {"predicted_mb": est.peak_bytes / 2**20, "parts_mb": {k: v / 2**20 for k, v in est.parts.items()},
            "predicted_tokens_per_s": est.tokens_per_s}


def render(rows: list[dict], machine: dict, fixed: dict) -> str:
    lines = ["| run | method | precision | cutoff x batch | r | checkpointing | predicted MB | measured peak RSS MB "
             "| error | predicted tokens/s | measured tokens/s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        k = r["keys"]
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error']} |||||||||")
            continue
        err = r["predicted_mb"] / r["peak_rss_mb"] - 1
        lines.append(f"| {r['name']} | {k['finetuning_type']} | {'bf16' if k.get('bf16') else 'fp32'} | "
                     f"{k['cutoff_len']} x {k['per_device_train_batch_size']} | {k.get('lora_rank', 8)} | "
                     f"{'on' if k.get('gradient_checkpointing') else 'off'} | {r['predicted_mb']:,.0f} | "
                     f"{r['peak_rss_mb']:,.0f} | {100 * err:+.1f}% | {r['predicted_tokens_per_s']:,.0f} | "
                     f"{r['tokens_per_s']:,.0f} |")
    lines.append("")
    lines.append(f"Fixed process cost (python + torch + transformers' Llama + lorakit.train imported): measured "
                 f"{fixed['measured_mb']:.0f} MB, the planner uses {fixed['planner_mb']:.0f} MB. Machine: "
                 f"{common.describe_machine(machine)}.")
    return "\n".join(lines)


CONFIGS = common.ROOT / "examples" / "configs"
GC_BF16 = {"bf16": True, "gradient_checkpointing": True, "per_device_train_batch_size": 1, "cutoff_len": 1024}
# (source, figure GB, what it is, model, keys, device); LLaMA-Factory's README "Hardware Requirement" table (rules
# of thumb, no settings given: LLaMA-Factory checkpoints gradients by default, so batch 1 x 1024 with checkpointing
# is assumed); torchtune's README "Finetuning resource requirements" (peak memory reserved, configs
# llama2/7B_qlora_single_device and 7B_lora_single_device: r=8, batch 2, activation checkpointing, alpaca, a bf16
# base; QLoRA on q,k,v,o and the MLP, LoRA on q,v; 512 tokens assumed)
PUBLISHED = [
    ("LLaMA-Factory", 120, "full, mixed precision", "llama-2-7b", {"finetuning_type": "full", **GC_BF16}, "H100"),
    ("LLaMA-Factory", 16, "LoRA, 16-bit", "llama-2-7b", {**GC_BF16}, "H100"),
    ("LLaMA-Factory", 10, "QLoRA, 8-bit", "llama-2-7b", {"quantization_bit": 8, **GC_BF16}, "H100"),
    ("LLaMA-Factory", 6, "QLoRA, 4-bit", "llama-2-7b", {"finetuning_type": "qlora", **GC_BF16}, "H100"),
    ("LLaMA-Factory", 160, "LoRA, 16-bit", "llama-3-70b", {**GC_BF16}, "H200"),
    ("LLaMA-Factory", 48, "QLoRA, 4-bit", "llama-3-70b", {"finetuning_type": "qlora", **GC_BF16}, "H200"),
    ("torchtune", 9.29, "QLoRA r=8, 1 x RTX 4090", "llama-2-7b",
     {"finetuning_type": "qlora", "lora_target": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
      **GC_BF16, "per_device_train_batch_size": 2, "cutoff_len": 512}, "RTX 4090"),
    ("torchtune", 17.18, "LoRA r=8 on q,v, 1 x RTX 4090", "llama-2-7b",
     {"lora_target": "q_proj,v_proj", **GC_BF16, "per_device_train_batch_size": 2, "cutoff_len": 512}, "RTX 4090"),
]
# the lorakit rows of bench/results/gpu/train.json (one H200, measured): r=16 all-linear, the demo set packed into
# rows of <= 512 tokens, 4 rows per micro-batch on a GPU (the harness packs each step's 16 sequences: ~2 rows)
H200_ROWS = [("demo", "fp32", {}), ("demo", "bf16", {"bf16": True})]
# the seeds' sizing claims: (claim, model, keys, device); verdicts are in the README, from these figures
CLAIMS = [
    ("seed 001: full fine-tuning a 7B model needs ~112 GB", "llama-2-7b",
     {"finetuning_type": "full", "per_device_train_batch_size": 1, "cutoff_len": 512, "gradient_checkpointing": True},
     "H200"),
    ("seed 001: QLoRA fine-tunes a 65B model on one 24 GB GPU", "llama-65b",
     {"finetuning_type": "qlora", **GC_BF16, "cutoff_len": 512, "optim": "paged_adamw_8bit"}, "24GB"),
    ("seed 002: 8 GB card: 7B with r=4", "llama-2-7b", {"lora_rank": 4, **GC_BF16, "cutoff_len": 512}, "8GB"),
    ("seed 002: 12 GB card: 13B with r=8", "llama-2-13b", {"lora_rank": 8, **GC_BF16, "cutoff_len": 512}, "12GB"),
    ("seed 002: 24 GB card: 30B with r=16", "llama-30b", {"lora_rank": 16, **GC_BF16, "cutoff_len": 512}, "24GB"),
    ("seed 000: LoRA fits an 8B model on one 24 GB GPU", "llama-3-8b", {**GC_BF16, "cutoff_len": 512}, "24GB"),
    ("seed 000: LoRA -60 % memory against full", "llama-3-8b", {**GC_BF16, "cutoff_len": 512}, "H200"),
    ("seed 000: QLoRA another -40 % against LoRA", "llama-3-8b",
     {"finetuning_type": "qlora", **GC_BF16, "cutoff_len": 512}, "H200"),
    ("seed 003: a 1 GB model (0.5B): LoRA 2 GB, full 16 GB+, QLoRA ~0.5 GB", "qwen2.5-0.5b",
     {**GC_BF16, "cutoff_len": 512}, "H200"),
    ("  the same with QLoRA: 8 GB, 7B r=4", "llama-2-7b",
     {"finetuning_type": "qlora", "lora_rank": 4, **GC_BF16, "cutoff_len": 512}, "8GB"),
    ("  the same with QLoRA: 12 GB, 13B r=8", "llama-2-13b",
     {"finetuning_type": "qlora", "lora_rank": 8, **GC_BF16, "cutoff_len": 512}, "12GB"),
    ("  the same with QLoRA: 24 GB, 30B r=16", "llama-30b",
     {"finetuning_type": "qlora", "lora_rank": 16, **GC_BF16, "cutoff_len": 512}, "24GB"),
    ("  full fine-tuning of the 8B (against LoRA's -60 %)", "llama-3-8b",
     {"finetuning_type": "full", **GC_BF16, "cutoff_len": 512}, "H200"),
    ("  full fine-tuning of the 0.5B", "qwen2.5-0.5b", {"finetuning_type": "full", **GC_BF16, "cutoff_len": 512},
     "H200"),
    ("  QLoRA of the 0.5B", "qwen2.5-0.5b", {"finetuning_type": "qlora", **GC_BF16, "cutoff_len": 512}, "H200"),
]


def planned(model: str, keys: dict, device: str) -> dict:
    """The planner's figures (GiB) for a model config in examples/configs: peak, training phase, load."""
    from lorakit.estimate import estimate_for_keys

    est = estimate_for_keys({"model_name_or_path": str(CONFIGS / model) if model else None, **keys}, device=device)
    train = sum(est.parts.values())
    return {"peak_gib": est.peak_bytes / 2**30, "train_gib": train / 2**30, "load_gib": est.load_bytes / 2**30,
            "train_without_process_gib": (train - est.parts["process"]) / 2**30, "fits": est.fits,
            "parts_gib": {k: v / 2**30 for k, v in est.parts.items()}}


def published() -> list[dict]:
    rows = []
    for source, figure, what, model, keys, device in PUBLISHED:
        rows.append({"source": source, "figure_gb": figure, "what": what, "model": model, "keys": keys,
                     "device": device, **planned(model, keys, device)})
    return rows


def h200_rows() -> list[dict]:
    """Predicted GPU peak (no CUDA context: max_memory_allocated does not see it) vs the H200 measurement."""
    from lorakit.estimate import estimate_for_keys

    measured = json.loads((common.RESULTS_DIR / "gpu" / "train.json").read_text())["rows"]
    out = []
    for data, precision, keys in H200_ROWS:
        row = next(r for r in measured if r["data"] == data and r["precision"] == precision and r["impl"] == "lorakit")
        est = estimate_for_keys({"dataset": str(common.ROOT / "demo" / "data" / "kb_train.json"), "packing": True,
                                 "cutoff_len": 512, "per_device_train_batch_size": 2, "lora_rank": 16, **keys},
                                device="H200")
        predicted = (max(sum(est.parts.values()), est.load_bytes) - est.parts["process"]) / 2**20
        out.append({"data": data, "precision": precision, "measured_mb": row["peak_gpu_mb"],
                    "predicted_mb": predicted, "error": predicted / row["peak_gpu_mb"] - 1})
    return out


def claims() -> list[dict]:
    return [{"claim": claim, "model": model, "keys": keys, "device": device, **planned(model, keys, device)}
            for claim, model, keys, device in CLAIMS]


def measure(names: set[str], steps: int, saved: dict) -> dict:
    """Measure the rows in `names` (and any row never measured); saved after each row, so a stop loses little."""
    measured = {r["name"]: r for r in saved.get("rows", [])}
    with tempfile.TemporaryDirectory() as tmp:
        data = long_records(Path(tmp) / "long.jsonl")
        for name, extra in ROWS:
            if name not in names and name in measured:
                continue
            print(f"validate_estimate: {name} ...", file=sys.stderr, flush=True)
            keys = row_keys(extra, data, Path(tmp) / name, steps)
            measured[name] = {"name": name, "steps": steps, **measure_row(keys)}
            print(f"validate_estimate: {name}: {measured[name]}", file=sys.stderr, flush=True)
            saved = {**saved, "machine": common.machine(), "rows": [measured[n] for n, _ in ROWS if n in measured]}
            RESULT.parent.mkdir(parents=True, exist_ok=True)
            RESULT.write_text(json.dumps(saved, indent=2) + "\n")
    return saved


def compare(saved: dict) -> dict:
    """Predict every measured row; the table, the worst error and the fixed cost measured now."""
    from lorakit.estimate.memory import CPU_PROCESS_BYTES

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = long_records(Path(tmp) / "long.jsonl")
        extras = dict(ROWS)
        for row in saved.get("rows", []):
            keys = row_keys(extras[row["name"]], data, Path(tmp) / row["name"], row.get("steps", 3))
            row = {k: v for k, v in row.items() if not k.startswith("predicted") and k != "parts_mb"}
            row["keys"] = {k: v for k, v in keys.items() if k not in ("dataset", "output_dir")}
            if "error" not in row:
                row.update(predict(keys))
            rows.append(row)
    fixed = {"measured_mb": fixed_cost_mb(), "planner_mb": CPU_PROCESS_BYTES / 2**20}
    ok = [r for r in rows if "error" not in r]
    worst = max((abs(r["predicted_mb"] / r["peak_rss_mb"] - 1) for r in ok), default=None)
    from lorakit.estimate.memory import CPU_HEAP_FACTOR, CPU_RECOMPUTE_HEAP

    return {**saved, "tolerance": TOLERANCE, "worst_error": worst, "fixed_cost": fixed, "heap_factor": CPU_HEAP_FACTOR,
            "recompute_heap": CPU_RECOMPUTE_HEAP, "rows": rows, "markdown": render(rows, saved["machine"], fixed)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help="comma-separated row names to (re)measure; the others keep their measurement")
    p.add_argument("--compare", action="store_true", help="no training: re-predict the saved measurements")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per measured run")
    p.add_argument("--published", action="store_true", help="also plan the published and seed figures (GPU)")
    args = p.parse_args(argv)
    common.setup_path()
    saved = json.loads(RESULT.read_text()) if RESULT.is_file() else {}
    if not args.compare:
        saved = measure(set(args.only.split(",")) if args.only else {n for n, _ in ROWS}, args.steps, saved)
    result = compare(saved)
    if args.published:
        result.update({"published": published(), "h200": h200_rows(), "claims": claims()})
    else:
        result.update({k: saved[k] for k in ("published", "h200", "claims") if k in saved})
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(result["markdown"])
    ok = [r for r in result["rows"] if "error" not in r]
    return 0 if result["worst_error"] is not None and result["worst_error"] <= TOLERANCE and len(ok) == len(
        result["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
