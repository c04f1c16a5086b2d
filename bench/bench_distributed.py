"""Several processes on one machine: 1 process x 2 threads against 2 processes x 1 thread (gloo), LoRA and full
(and, with --methods lora_fsdp, LoRA under FSDP2 on 2 processes).

A third row per method, 1 process x 1 thread, shows what one core does alone: on a machine other jobs share, a
2-thread process can lose far more to its threads waiting on each other than a second process loses to gloo.

Each configuration is a real `lorakit train` run (lorakit.train.train in fresh interpreters; the 2-process rows
get torchrun's variables, so they run DDP for LoRA, FSDP2 for full and for lora_fsdp) on SmolLM2-135M-Instruct,
the same global batch (8 sequences per step), the same steps, fp32. Per row: real (non-padding) tokens/s over the
steps after the first, peak RSS of each process, the bytes of the step's collectives, and the share of a step
those collectives take, timed on the run's own process group at the end of the run with buffers of the same sizes
(DDP: one all-reduce of the trainable fp32 gradients; FSDP2: every weight all-gathered twice, for LoRA the frozen
base too, and the trainable gradients reduce-scattered once; plus lorakit's two scalar sums). Timed apart from
the step, the share is an upper bound: DDP overlaps its all-reduce with the backward. A scaling estimate for 8
GPUs and for 2 nodes follows from the measured volumes at stated bandwidths and compute rates; it is labelled as
an estimate, not a measurement.

    python bench/bench_distributed.py [--smoke] [--steps N] [--methods lora,full,lora_fsdp] [--configs 2x1,1x1]
        [--results NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import common

NAME = "distributed"
WORDS = ("the model learns a small adapter for each layer while the base stays frozen and the data stays the same "
         "every rank takes its share of the batch and the gradients meet once per step").split()
# the estimate's assumptions (not measured here)
NVLINK_GBS = 150.0  # all-reduce bus bandwidth within one 8-GPU node (A100 NVLink, practical)
NODE_LINK_GBS = 12.5  # between two nodes: 100 Gb/s per node
GPU_TFLOPS = 125.0  # achieved bf16 matmul rate per GPU (40 % of an A100's 312)
GPU_TOKENS = 8 * 1024  # tokens per GPU per step in the estimate
METHODS = {"lora": ("finetuning_type=lora",), "full": ("finetuning_type=full",),
           "lora_fsdp": ("finetuning_type=lora", "fsdp=full_shard")}  # --methods name -> its train keys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny model from a config, 2 steps, no download")
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per row (the first is not timed)")
    p.add_argument("--methods", default="lora,full", help=f"comma-separated, of {', '.join(METHODS)} (lora_fsdp: "
                   "2 processes only, against lora's one-process row)")
    p.add_argument("--configs", default="1x2,2x1,1x1", help="processes x threads per method (lora_fsdp: 2x1 "
                   "only); 'vs 1 process' compares with the method's 1x2 row, else its 1x1 row")
    p.add_argument("--results", default=NAME, help="bench/results/<name>.json to write (another name keeps the "
                   "full run's file)")
    p.add_argument("--row", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def configs(text: str) -> list[tuple[int, int]]:
    try:
        out = [tuple(int(x) for x in c.split("x")) for c in text.split(",")]
    except ValueError:
        raise SystemExit(f"--configs: {text!r} is not a comma list of PROCSxTHREADS (e.g. 2x1,1x1)") from None
    if any(len(c) != 2 or min(c) < 1 for c in out):
        raise SystemExit(f"--configs: {text!r} is not a comma list of PROCSxTHREADS (e.g. 2x1,1x1)")
    return out


def data_file(smoke: bool):
    """64 alpaca records of 30-80 words (seeded), in the bench cache."""
    import random

    path = common.cache_dir() / f"distributed-{'smoke' if smoke else 'full'}.jsonl"
    rng = random.Random(0)
    lines = []
    for _ in range(64):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 30) if smoke else rng.randint(30, 80)))
        half = len(text) // 2
        lines.append(json.dumps({"instruction": text[:half], "input": "", "output": text[half:]}))
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------- one rank (in its own interpreter)


def collective_seconds(trainer, mode: str) -> tuple[float, int]:
    """(seconds, bytes) of one step's collectives, timed on the run's process group (median of 3)."""
    import statistics

    import torch
    import torch.distributed as dist

    world = trainer.world
    numel = sum(p.numel() for _, p in trainer.trainable.named_trainable())  # whole tensors, also under FSDP2
    gathered = sum(p.numel() for p in trainer.model.parameters())  # FSDP2 gathers every weight, frozen ones too
    if not world.distributed:
        return 0.0, 0
    flat = torch.ones(numel)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        if mode == "fsdp":
            shard = torch.ones(gathered // world.size)
            whole = torch.empty(shard.numel() * world.size)
            for _ in range(2):  # forward and (resharded) backward
                dist.all_gather_into_tensor(whole, shard)
            grads = torch.ones(numel // world.size * world.size)
            dist.reduce_scatter_tensor(torch.empty(numel // world.size), grads)
        else:
            dist.all_reduce(flat)
        world.sum([1.0])
        world.sum([1.0, 2.0, 3.0])
        times.append(time.perf_counter() - start)
    volume = (2 * gathered + numel if mode == "fsdp" else numel) * 4
    return statistics.median(times), volume


def run_rank(spec: dict) -> dict:
    import torch

    from lorakit.train import load_config, train

    if "RANK" not in os.environ:
        torch.set_num_threads(spec["threads"])
    marks, comm = [], {}

    def on_step(trainer) -> None:
        marks.append((time.perf_counter(), trainer.run_tokens))
        if trainer.step == trainer.schedule.total_steps:
            mode = trainer.sharded.plan.mode if trainer.sharded else "none"
            comm["seconds"], comm["bytes"] = collective_seconds(trainer, mode)
            comm["mode"] = mode
            comm["trainable"] = sum(p.numel() for _, p in trainer.trainable.named_trainable())
            comm["params"] = trainer.trainable.total_params()

    keys = [f"model_name_or_path={spec['model']}", f"dataset={spec['data']}", f"output_dir={spec['out']}",
            "overwrite_output_dir=true", f"max_steps={spec['steps']}", f"per_device_train_batch_size={spec['bs']}",
            f"cutoff_len={spec['cutoff_len']}", "logging_steps=1", "save_strategy=no", "learning_rate=1e-4",
            *METHODS[spec["method"]], "lora_rank=16", "lora_alpha=32", "lora_target=all"]
    keys += ["template=chatml"] if spec["smoke"] else []  # the smoke tokenizer has no chat template
    train(load_config(None, keys)[0], on_step)
    (t0, n0), (t1, n1) = marks[0], marks[-1]
    step_s = (t1 - t0) / max(len(marks) - 1, 1)
    return {**spec, "rank": int(os.environ.get("RANK", 0)), "tokens_per_s": (n1 - n0) / max(t1 - t0, 1e-9),
            "step_s": step_s, "peak_rss_mb": common.peak_rss_mb(), "comm_s": comm["seconds"],
            "comm_share": comm["seconds"] / step_s, "comm_bytes": comm["bytes"], "sharding": comm["mode"],
            "trainable": comm["trainable"], "params": comm["params"]}


# ---------------------------------------------------------------- the rows


def run_config(spec: dict) -> list[dict]:
    """The processes of one configuration (one, or two ranks on 127.0.0.1); one result per process."""
    from lorakit.train.distributed import free_port

    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
           "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(spec["threads"])}
    port = str(free_port())
    procs = []
    for rank in range(spec["procs"]):
        extra = {} if spec["procs"] == 1 else {"RANK": str(rank), "LOCAL_RANK": str(rank),
                                               "WORLD_SIZE": str(spec["procs"]),
                                               "LOCAL_WORLD_SIZE": str(spec["procs"]), "MASTER_ADDR": "127.0.0.1",
                                               "MASTER_PORT": port}
        procs.append(subprocess.Popen([sys.executable, str(common.BENCH_DIR / "bench_distributed.py"), "--row",
                                       json.dumps(spec)], env={**env, **extra}, cwd=common.ROOT, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=3600)
        rows = [json.loads(line[len(common.ROW_TAG):]) for line in out.splitlines() if line.startswith(common.ROW_TAG)]
        last = (err.strip().splitlines() or [""])[-1][-200:]
        results.append(rows[0] if rows else {**spec, "error": f"exit {p.returncode}: {last}"})
    return results


def specs(args: argparse.Namespace) -> list[dict]:
    import fixtures

    model = str(fixtures.model_dir(args.smoke))
    data = str(data_file(args.smoke))
    base = {"smoke": args.smoke, "model": model, "data": data, "steps": 2 if args.smoke else args.steps,
            "cutoff_len": 64 if args.smoke else 128}
    out, tag = [], "-smoke" if args.smoke else ""
    for method in args.methods.split(","):
        if method not in METHODS:
            raise SystemExit(f"--methods: unknown method {method!r} (known: {', '.join(METHODS)})")
        for procs, threads in ((2, 1),) if method == "lora_fsdp" else configs(args.configs):
            out.append({**base, "method": method, "procs": procs, "threads": threads, "bs": 8 // procs,
                        "out": str(common.cache_dir() / f"distributed-out-{method}-{procs}x{threads}{tag}")})
    return out


def estimate(params: int, bytes_: int, method: str) -> dict:
    """Per-step collectives against compute on GPUs, from the measured volume (ring all-reduce: 2 (W-1)/W x bytes
    over the slowest link); compute = (6 N for full, 4 N for LoRA: no weight gradients of the N base parameters)
    x tokens / rate."""
    flops = (6 if method == "full" else 4) * params * GPU_TOKENS
    compute_ms = flops / (GPU_TFLOPS * 1e12) * 1e3
    out = {"compute_ms": compute_ms}
    for name, world, gbs in (("8_gpus", 8, NVLINK_GBS), ("2_nodes_x_8", 16, NODE_LINK_GBS)):
        ms = 2 * (world - 1) / world * bytes_ / (gbs * 1e9) * 1e3
        out[name] = {"comm_ms": ms, "comm_over_compute": ms / compute_ms}
    return out


def summarise(results: list[list[dict]]) -> tuple[list[dict], str]:
    rows, lines = [], []
    for procs in results:
        first = procs[0]
        if any("error" in r for r in procs):
            rows.append({k: first[k] for k in ("method", "procs", "threads")} | {"error": next(
                r["error"] for r in procs if "error" in r)})
            lines.append([first["method"], f"{first['procs']} x {first['threads']}", rows[-1]["error"][:80]]
                         + [None] * 5)
            continue
        row = {k: first[k] for k in ("method", "procs", "threads", "bs", "steps", "sharding", "trainable", "params")}
        row.update(tokens_per_s=first["tokens_per_s"], step_s=first["step_s"],
                   peak_rss_mb=[r["peak_rss_mb"] for r in procs], comm_share=first["comm_share"],
                   comm_bytes=first["comm_bytes"], ddp_allreduce_bytes=first["trainable"] * 4)
        rows.append(row)
    for row in rows:
        if "error" in row:
            continue
        base = row["method"].removesuffix("_fsdp")  # one process runs LoRA alike with or without the fsdp key
        singles = [r for r in rows if r["method"] == base and r["procs"] == 1 and "error" not in r]
        single = max(singles, key=lambda r: r["threads"], default=None)  # the 1x2 row, else 1x1
        row["vs_one_process"] = row["tokens_per_s"] / single["tokens_per_s"] if single else None
        row["estimate"] = estimate(row["params"], row["ddp_allreduce_bytes"], row["method"])
        how = {"none": "one process", "ddp": "DDP", "fsdp": "FSDP2"}[row["sharding"]]
        lines.append([row["method"], f"{row['procs']} x {row['threads']} ({how})", row["tokens_per_s"],
                      f"{row['vs_one_process']:.2f}x" if row["vs_one_process"] else None,
                      " / ".join(f"{m:.0f}" for m in row["peak_rss_mb"]),
                      f"{100 * row['comm_share']:.1f}%" if row["procs"] > 1 else "–",
                      f"{row['comm_bytes'] / 1e6:.1f}" if row["procs"] > 1 else "–"])
    headers = ["method", "processes x threads", "real tokens/s", "vs 1 process", "peak RSS per process (MB)",
               "collectives / step", "MB in collectives / step"]
    md = common.table(headers, lines)
    est = [r for r in rows if "error" not in r and r["procs"] == 1]
    est = [r for r in est if r["threads"] == max(x["threads"] for x in est if x["method"] == r["method"])]
    if est:
        md += ("\n\nEstimate, not measured (from the measured gradient volume; ring all-reduce 2(W-1)/W x bytes; "
               f"{NVLINK_GBS:g} GB/s within a node, {NODE_LINK_GBS:g} GB/s between nodes, {GPU_TFLOPS:g} TFLOP/s "
               f"and {GPU_TOKENS} tokens per GPU per step):\n\n")
        md += common.table(["method", "fp32 gradients all-reduced (MB)", "compute / step (ms)",
                            "8 GPUs: all-reduce ms (share of compute)", "2 nodes x 8: all-reduce ms (share)"],
                           [[r["method"], f"{r['ddp_allreduce_bytes'] / 1e6:.1f}", r["estimate"]["compute_ms"],
                             f"{r['estimate']['8_gpus']['comm_ms']:.2f} "
                             f"({100 * r['estimate']['8_gpus']['comm_over_compute']:.0f}%)",
                             f"{r['estimate']['2_nodes_x_8']['comm_ms']:.1f} "
                             f"({100 * r['estimate']['2_nodes_x_8']['comm_over_compute']:.0f}%)"] for r in est])
    return rows, md


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.setup_path()
    if args.row:
        common.emit_row(run_rank(json.loads(args.row)))
        return 0
    machine = common.machine()
    results = []
    for spec in specs(args):
        results.append(run_config(spec))
        r = results[-1][0]
        print(f"  {spec['method']} {spec['procs']}x{spec['threads']}: " + (r.get("error") or
              f"{r['tokens_per_s']:.0f} tok/s, {r['peak_rss_mb']:.0f} MB, comm {100 * r['comm_share']:.1f}%"),
              file=sys.stderr, flush=True)
    rows, md = summarise(results)
    what = "tiny model (smoke)" if args.smoke else "SmolLM2-135M-Instruct"
    md = (f"### Several processes: {what}, 8 sequences per step (cutoff {results[0][0].get('cutoff_len')}), "
          f"{results[0][0].get('steps')} steps, fp32, gloo\n\n{md}\n\nMachine: {common.describe_machine(machine)}.")
    print(md)
    common.write_results(args.results, {"machine": machine, "rows": rows, "runs": results}, md, args.smoke)
    return 0 if all("error" not in r for procs in results for r in procs) else 1


if __name__ == "__main__":
    sys.exit(main())
