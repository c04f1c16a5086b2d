"""Training throughput, memory and loss: lorakit vs PEFT + transformers, side by side in one run.

SmolLM2-135M-Instruct, LoRA r=16 alpha 32 dropout 0 on all linear layers, cutoff_len 512, 16 sequences per
optimizer step, on the demo set and LLaMA-Factory's alpaca_en_demo; an fp32 pair and a bf16-autocast pair. Each
row runs in its own process (see train_rows.py for what each implementation does); rows are interleaved
(peft, lorakit, lorakit, peft, ...) so that load from other processes hits both alike. MFU is model FLOPs/s
(the same formula for both rows) over the best matmul GFLOP/s measured here at the model's shapes.

    python bench/bench_train.py [--smoke] [--steps N] [--repeats R] [--data demo,alpaca]
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

import common  # noqa: E402

NAME = "train"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny model from a config, 2 steps, no download")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per row (the first is not timed)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each row; medians are reported")
    p.add_argument("--data", default="demo,alpaca")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (code unchanged; GEMM peak measured there)")
    p.add_argument("--random-init", metavar="DIR",
                   help="a model folder's config and tokenizer with random weights (speed only, e.g. on a machine "
                        "without the default model)")
    p.add_argument("--row", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def row_specs(args: argparse.Namespace) -> list[dict]:
    base = {"smoke": args.smoke, "steps": 2 if args.smoke else args.steps, "seqs_per_step": 16 if not args.smoke
            else 8, "cutoff_len": 512 if not args.smoke else 64, "micro_batch": 4,
            "eval_examples": 32 if not args.smoke else 8, "device": args.device}
    if args.random_init:
        base["random_init"] = args.random_init
    specs = []
    for data in (["synthetic"] if args.smoke else args.data.split(",")):
        for precision in args.precisions.split(","):
            for rep in range(args.repeats):
                # bf16: PEFT on a bf16-loaded base (LLaMA-Factory) and on an fp32 base under autocast; the faster
                # of the two is the reference
                impls = ("peft", "peft_fp32base", "lorakit") if precision == "bf16" else ("peft", "lorakit")
                order = impls if rep % 2 == 0 else impls[::-1]
                specs += [{**base, "data": data, "precision": precision, "impl": impl, "repeat": rep}
                          for impl in order]
    return specs


def gemm_shapes(smoke: bool) -> list[tuple[int, int, int]]:
    """(tokens, in, out) of the model's matmuls: attention and MLP projections, and a chunk of the output head."""
    if smoke:
        return [(64, 64, 128)]
    return [(512, 576, 576), (512, 576, 1536), (512, 1536, 576), (341, 576, 49152)]


def summarise(results: list[dict], peaks: dict) -> tuple[list[dict], str]:
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["data"], r["precision"], r["impl"]), []).append(r)
    rows, lines = [], []
    for (data, precision, impl), runs in groups.items():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            rows.append({"data": data, "precision": precision, "impl": impl, "error": runs[0]["error"]})
            continue
        row = {"data": data, "precision": precision, "impl": impl, "runs": len(ok)}
        for key in ("tokens_per_s", "peak_rss_mb", "first_step_s", "eval_loss", "model_gflops_per_s"):
            row[key] = common.median([r[key] for r in ok])
        row["peak_gpu_mb"] = common.median([r.get("peak_gpu_mb") for r in ok])
        row["mfu"] = row["model_gflops_per_s"] / peaks[precision]
        rows.append(row)
    by_key = {(r["data"], r["precision"], r["impl"]): r for r in rows}
    for r in rows:
        refs = [by_key.get((r["data"], r["precision"], impl)) for impl in ("peft", "peft_fp32base")]
        refs = [x for x in refs if x and "error" not in x]
        ref = max(refs, key=lambda x: x["tokens_per_s"]) if refs else None  # the faster reference
        if ref is not None:
            r["reference"] = ref["impl"]
        if r["impl"] == "lorakit" and ref and "error" not in r and "error" not in ref:
            r["speedup"] = r["tokens_per_s"] / ref["tokens_per_s"]
            r["rss_ratio"] = r["peak_rss_mb"] / ref["peak_rss_mb"]
            if r["peak_gpu_mb"] and ref["peak_gpu_mb"]:
                r["gpu_ratio"] = r["peak_gpu_mb"] / ref["peak_gpu_mb"]
            r["eval_loss_diff"] = r["eval_loss"] / ref["eval_loss"] - 1
    gpu = any(r.get("peak_gpu_mb") for r in rows)  # on a GPU the memory that counts is the device's
    memory, ratio = ("peak_gpu_mb", "gpu_ratio") if gpu else ("peak_rss_mb", "rss_ratio")
    headers = ["data", "precision", "implementation", "real tokens/s", "vs PEFT",
               "peak GPU memory (MB)" if gpu else "peak RSS (MB)", "vs PEFT", "s to first step", "eval loss", "MFU"]
    for r in rows:
        if "error" in r:
            lines.append([r["data"], r["precision"], r["impl"], r["error"][:80]] + [None] * 6)
            continue
        name = {"lorakit": "lorakit", "peft": "PEFT + transformers",
                "peft_fp32base": "PEFT + transformers, fp32 base under autocast"}[r["impl"]]
        if r["impl"] == "lorakit" and r["precision"] == "bf16" and "reference" in r:
            name += " (vs PEFT's " + ("fp32-base" if r["reference"] == "peft_fp32base" else "bf16-base") + " row)"
        lines.append([r["data"], r["precision"], name, r["tokens_per_s"],
                      f"{r['speedup']:.2f}x" if "speedup" in r else None, r[memory],
                      f"{r[ratio]:.2f}x" if ratio in r else None, r["first_step_s"],
                      f"{r['eval_loss']:.4f}" + (f" ({100 * r['eval_loss_diff']:+.1f}%)" if "eval_loss_diff" in r
                                                 else ""), f"{100 * r['mfu']:.1f}%"])
    return rows, common.table(headers, lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.setup_path()
    if args.row:
        import train_rows

        common.emit_row(train_rows.run(json.loads(args.row), T_START))
        return 0
    import torch

    machine = common.machine()
    seconds = 0.02 if args.smoke else 0.5
    peaks = {"fp32": common.gemm_peak(gemm_shapes(args.smoke), torch.float32, seconds),
             "bf16": common.gemm_peak(gemm_shapes(args.smoke), torch.bfloat16, seconds)}
    if not args.smoke and "alpaca" in args.data:
        common.alpaca_en_demo()  # fetch before any row is timed
    results = []
    for spec in row_specs(args):
        if args.smoke:  # in-process: seconds instead of a fresh interpreter per row (RSS is then not per row)
            import train_rows

            results.append(train_rows.run(spec, time.perf_counter()))
        else:
            results.append(common.run_row(common.BENCH_DIR / "bench_train.py", spec))
        r = results[-1]
        print(f"  {r['data']} {r['precision']} {r['impl']}: " + (r.get("error") or
              f"{r['tokens_per_s']:.0f} tok/s, {r['peak_rss_mb']:.0f} MB, eval {r['eval_loss']:.4f}"),
              file=sys.stderr, flush=True)
    rows, md = summarise(results, peaks)
    steps = results[0]["steps"] if results else args.steps
    md = (f"### Training: LoRA r=16 all-linear, 16 sequences/step, {steps} optimizer steps per row\n\n{md}\n\n"
          f"GEMM peak measured here at the model's shapes: fp32 {peaks['fp32']:.0f} GFLOP/s, "
          f"bf16 {peaks['bf16']:.0f} GFLOP/s. Machine: {common.describe_machine(machine)}.")
    print(md)
    payload = {"machine": machine, "gemm_peak_gflops": peaks, "rows": rows, "runs": results}
    common.write_results(NAME, payload, md, args.smoke)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
