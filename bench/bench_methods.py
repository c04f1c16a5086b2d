"""LoRA, PiSSA, LoRA-GA and AdaLoRA side by side: loss curves and held-out scores after the same steps.

Every row is one `lorakit train` run in its own process (same data, seed, steps, batch, r = 8 on all-linear; AdaLoRA
starts at init_r 12 and ends at target_r 4, about r = 8 on average over the run), then a held-out score: the loss on
the demo knowledge base's held-out paraphrases (demo/data/kb_heldout.json, never trained on), and on LLaMA-Factory's
alpaca_en_demo the loss on a held-out split of 48 records. LoRA-GA runs at LoRA's learning rate and at the authors'
recipe (rsLoRA and a learning rate near full fine-tuning's), with the paper's scale and with PEFT's. A last row
measures LoRA-GA's one-time gradient estimate (seconds, peak RSS against the same process before it).

    python bench/bench_methods.py [--smoke] [--only kb|alpaca]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import common

NAME = "methods"
LORA_LR, FULL_LR = 2e-3, 2e-4  # near the demo's LoRA rate, and one near full fine-tuning's for this model
METHODS = [  # (label, overrides)
    ("LoRA", {"learning_rate": LORA_LR}),
    ("LoRA, full-FT lr", {"learning_rate": FULL_LR}),
    ("PiSSA", {"learning_rate": LORA_LR, "pissa_init": True}),
    ("AdaLoRA", {"learning_rate": LORA_LR, "use_adalora": True, "adalora_init_r": 12, "adalora_target_r": 4,
                 "adalora_tinit": 4, "adalora_tfinal": 8}),
    ("LoRA-GA", {"learning_rate": LORA_LR, "loraga_init": True, "use_rslora": True}),
    ("LoRA-GA, full-FT lr", {"learning_rate": FULL_LR, "loraga_init": True, "use_rslora": True}),
    ("LoRA-GA, PEFT scale", {"learning_rate": LORA_LR, "loraga_init": True, "loraga_stable_scale_on": "B"}),
]


def data_settings(dataset: str, smoke: bool) -> dict:
    if smoke:
        return {"dataset": str(common.BENCH_DIR / ".cache" / "smoke_data.jsonl"), "max_steps": 4, "lora_rank": 4,
                "per_device_train_batch_size": 4, "val_size": 4}
    if dataset == "kb":
        return {"dataset": "kb_train", "dataset_dir": str(common.ROOT / "demo" / "data"), "template": "chatml",
                "max_steps": 30, "per_device_train_batch_size": 8, "val_size": 0}
    return {"dataset": str(common.alpaca_en_demo()), "max_steps": 20, "per_device_train_batch_size": 4,
            "cutoff_len": 256, "val_size": 48}


def run(spec: dict) -> dict:
    """One training run (inside its own process) and its held-out score."""
    from lorakit.train import load_config, train

    out = Path(tempfile.mkdtemp(prefix="bench-methods-"))
    settings = {"lora_rank": 8, "lora_target": "all", "bf16": True, "lr_scheduler_type": "cosine",
                "warmup_ratio": 0.05, "logging_steps": 1, "save_strategy": "no", "output_dir": str(out),
                "overwrite_output_dir": True, "seed": 0, **data_settings(spec["dataset"], spec["smoke"]),
                **spec["overrides"]}
    if spec["smoke"] and settings.get("use_adalora"):
        settings.update(adalora_tinit=1, adalora_tfinal=1)
    if spec["smoke"]:
        settings["model_name_or_path"] = spec["model"]
    config, _ = load_config(None, [f"{k}={json.dumps(v) if not isinstance(v, str) else v}"
                                   for k, v in settings.items()])
    log = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stderr(log):
        results = train(config)
    seconds = time.perf_counter() - start
    err = log.getvalue()
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line and "eval_loss" not in line]
    trainable = re.search(r"trainable params: ([\d,]+)", err)
    ga = re.search(r"LoRA-GA: gradients of \d+ layers from \d+ batches in ([\d.]+) s", err)
    row = {**spec, "losses": losses, "seconds": round(seconds, 1), "peak_rss_mb": common.peak_rss_mb(),
           "trainable": int(trainable.group(1).replace(",", "")) if trainable else None,
           "loraga_seconds": float(ga.group(1)) if ga else None, "eval_loss": results.get("eval_loss")}
    if spec["dataset"] == "kb" and not spec["smoke"]:
        row["eval_loss"] = kb_heldout_loss(out)
    return row


def kb_heldout_loss(adapter: Path) -> float:
    """Mean loss of the answers to the 120 held-out paraphrases (teacher-forced, the trainer's own loss)."""
    import torch

    from lorakit.data import encode_records, get_template, load_records
    from lorakit.evaluate import reference_loss
    from lorakit.lora import LoraModel
    from lorakit.models import load_model

    model, tokenizer, _ = load_model(None, dtype="float32")
    lora = LoraModel.from_pretrained(model, adapter).eval()
    records = load_records("kb_heldout", dataset_dir=str(common.ROOT / "demo" / "data"))
    examples, _ = encode_records(records, tokenizer, get_template("chatml", tokenizer), cutoff_len=512)
    with torch.no_grad():
        return reference_loss(lora, examples, 16, tokenizer.pad_token_id or 0)[0]


def loraga_cost(spec: dict) -> dict:
    """The one-time estimate alone: seconds and peak RSS above the process after loading and encoding."""
    import resource

    import torch

    from lorakit.models import load_model
    from lorakit.train import load_config
    from lorakit.train.loraga_init import estimate_lora_ga
    from lorakit.train.methods import lora_config_for
    from lorakit.train.prepare import preflight, prepare_data

    settings = {"lora_rank": 8, "lora_target": "all", "loraga_init": True, "output_dir": tempfile.mkdtemp(),
                **data_settings(spec["dataset"], spec["smoke"])}
    if spec["smoke"]:
        settings["model_name_or_path"] = spec["model"]
    config, _ = load_config(None, [f"{k}={v}" for k, v in settings.items()])
    plan = preflight(config)
    model, tokenizer, _ = load_model(config.model_name_or_path, dtype="float32")
    data = prepare_data(config, plan.records, tokenizer)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    estimate_lora_ga(model, lora_config_for(config, None), config, data.items, tokenizer.pad_token_id or 0,
                     torch.device("cpu"), torch.bfloat16, say=lambda *_: None)
    return {**spec, "seconds": round(time.perf_counter() - start, 1), "rss_before_mb": round(before, 1),
            "peak_rss_mb": common.peak_rss_mb(), "batches": config.loraga_batches}


def smoke_model() -> str:
    """The tests' tiny Llama on disk, and a few alpaca records for it."""
    sys.path.insert(0, str(common.ROOT / "tests"))
    from cli_setup import save_tiny_model

    cache = common.BENCH_DIR / ".cache"
    cache.mkdir(exist_ok=True)
    model = cache / "smoke_model"
    if not (model / "config.json").is_file():
        save_tiny_model(model)
    facts = [("What is the VPN address?", "It is vpn.example."), ("Say some digits.", "0123456789")]
    (cache / "smoke_data.jsonl").write_text("".join(json.dumps({"instruction": q, "input": "", "output": a}) + "\n"
                                                    for q, a in facts * 12))
    return str(model)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in rows if "losses" in r})
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for r in rows:
            if r.get("dataset") == dataset and r.get("losses"):
                ax.plot(range(1, len(r["losses"]) + 1), r["losses"], label=r["method"])
        ax.set_title({"kb": "demo knowledge base", "alpaca": "alpaca_en_demo"}.get(dataset, dataset))
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--only", choices=["kb", "alpaca"])
    p.add_argument("--row")
    args = p.parse_args(argv)
    common.setup_path()
    if args.row:
        spec = json.loads(args.row)
        common.emit_row(loraga_cost(spec) if spec.get("cost") else run(spec))
        return 0
    machine = common.machine()
    model = smoke_model() if args.smoke else None
    datasets = ["kb"] if args.smoke else [args.only] if args.only else ["kb", "alpaca"]
    methods = METHODS[:1] + METHODS[3:5] if args.smoke else METHODS
    rows = []
    for dataset in datasets:
        for method, overrides in methods:
            spec = {"dataset": dataset, "method": method, "overrides": overrides, "smoke": args.smoke, "model": model}
            rows.append(common.run_row(Path(__file__), spec))
            print(f"  {dataset} {method}: {json.dumps({k: rows[-1].get(k) for k in ('eval_loss', 'error')})}",
                  file=sys.stderr, flush=True)
    cost = common.run_row(Path(__file__), {"dataset": datasets[0], "cost": True, "smoke": args.smoke, "model": model})
    lines = []
    for r in rows:
        losses = r.get("losses") or []
        lora = next((x for x in rows if x["dataset"] == r["dataset"] and x["method"] == "LoRA" and x.get("losses")),
                    None)
        reached = None  # the first step at which this run's loss is at or below LoRA's last
        if losses and lora:
            reached = next((i + 1 for i, v in enumerate(losses) if v <= lora["losses"][-1]), None)
        lines.append([r["dataset"], r["method"], r.get("trainable"), losses[0] if losses else None,
                      losses[-1] if losses else None, reached, r.get("eval_loss"), r.get("loraga_seconds"),
                      r.get("error")])
    md = ("### LoRA, PiSSA, LoRA-GA, AdaLoRA: the same steps on the same data (r = 8, all-linear, bf16)\n\n"
          + common.table(["data", "method", "trainable", "first loss", "last loss", "steps to LoRA's last loss",
                          "held-out loss", "LoRA-GA estimate s", "error"], lines)
          + f"\n\nLoRA-GA's one-time estimate alone ({cost.get('batches')} batches of {cost.get('dataset')}): "
            f"{cost.get('seconds')} s, peak RSS {cost.get('peak_rss_mb')} MB against {cost.get('rss_before_mb')} MB "
            f"before it. Machine: {common.describe_machine(machine)}.")
    print(md)
    out = common.write_results(NAME, {"machine": machine, "rows": rows, "loraga_cost": cost}, md, args.smoke)
    plot(rows, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
