"""QLoRA vs LoRA: resident weight memory, peak training memory, step time and eval loss after the same steps.

SmolLM2-135M-Instruct (the embedded default, loaded in fp32) on the demo knowledge-base set, LoRA r=16 alpha 32 on
all linear layers, through lorakit's own trainer (make_trainable -> Trainer.train_step -> Trainer.evaluate), in
fp32 and with bf16 autocast. QLoRA rows quantize every linear layer but the output head to 4-bit NF4 with double
quantization while the model loads (`load_model(..., quantization=quantization_of(cfg))`), before LoRA is
added. Every row runs in a process of its own:
- weights: bytes of parameters + buffers (+ bitsandbytes' constants) once the model is set up;
- RSS after setup: resident memory after setup (gc + malloc_trim), the process baseline (torch etc.) included;
  it is not the weights alone: file-backed pages of the loaded checkpoint come and go, and the heap keeps some
  of what quantizing freed;
- training working set: peak RSS during the training steps (VmHWM, reset after setup) minus RSS after setup:
  activations, gradients, optimizer state; "weights + working set" is the memory training needs;
- process peak: the row's peak RSS over setup and training (VmHWM before the reset, and after training);
- step: median seconds of the timed optimizer steps (the first is not timed).
A layer row times one linear forward+backward (2048 tokens) dense vs lorakit's QuantLinear vs bitsandbytes'
Linear4bit: the measurement behind quantization_method auto's choice (bitsandbytes when installed).

    python bench/bench_qlora.py [--smoke] [--steps N]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import common

NAME = "qlora"
DEMO = common.ROOT / "demo" / "data"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny model from a config, 2 steps, a few seconds")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per row (the first is not timed)")
    p.add_argument("--render", action="store_true", help="rewrite the table of the saved results/qlora.json")
    p.add_argument("--row", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def row_specs(args: argparse.Namespace) -> list[dict]:
    base = {"smoke": args.smoke, "steps": 2 if args.smoke else args.steps}
    rows = [{**base, "kind": "layer"}]
    for precision in ("fp32", "bf16"):
        rows += [{**base, "kind": "train", "method": "lora", "precision": precision},
                 {**base, "kind": "train", "method": "qlora", "precision": precision, "backend": "lorakit"}]
    rows.append({**base, "kind": "train", "method": "qlora", "precision": "fp32", "backend": "bnb"})
    return rows


# ---------------------------------------------------------------- inside a row's process


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return common.peak_rss_mb()


def vm_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def release_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so RSS shows what is held
    except OSError:
        pass


def reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS
    except OSError:
        pass


def smoke_model(root: Path) -> str:
    """A 2-layer Llama + a small BPE tokenizer trained here, saved as a model directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    records = json.loads((DEMO / "kb_train.json").read_text())
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([" ".join(r.values()) for r in records], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    config = LlamaConfig(vocab_size=len(fast), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=fast.pad_token_id,
                         eos_token_id=fast.eos_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(root)
    fast.save_pretrained(root)
    return str(root)


def train_row(spec: dict) -> dict:
    import torch

    from lorakit.models import load_model
    from lorakit.quant import weight_bytes
    from lorakit.train.methods import make_trainable, quantization_of
    from lorakit.train.options import from_mapping
    from lorakit.train.prepare import prepare_data
    from lorakit.train.trainer import Interrupt, Trainer, pick_precision, seed_everything

    baseline = vm_rss_mb()
    model_path = smoke_model(Path(tempfile.mkdtemp())) if spec["smoke"] else None
    cfg, _ = from_mapping({
        "model_name_or_path": model_path, "dataset": "kb_train", "dataset_dir": str(DEMO), "val_size": 40,
        "cutoff_len": 256, "lora_rank": 16, "lora_alpha": 32, "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 8, "learning_rate": 5e-4, "max_steps": spec["steps"], "warmup_steps": 0,
        "lr_scheduler_type": "constant", "bf16": spec["precision"] == "bf16", "seed": 0,
        **({"quantization_bit": 4, "quantization_method": spec["backend"]} if spec["method"] == "qlora" else {})})
    device = torch.device("cpu")
    model, tokenizer, _ = load_model(model_path, dtype="float32", device=device, quantization=quantization_of(cfg))
    from lorakit.data import load_records

    data = prepare_data(cfg, load_records(cfg.dataset, cfg.dataset_dir, cfg.stage), tokenizer)
    seed_everything(cfg.seed)
    trainable = make_trainable(model, cfg)
    model.config.use_cache = False
    model.train()
    trainer = Trainer(cfg, trainable, tokenizer, data, device, pick_precision(device, cfg))
    release_memory()
    weights, setup, setup_peak = weight_bytes(model) / 2**20, vm_rss_mb(), vm_hwm_mb()
    reset_peak()
    times, losses = [], []
    with Interrupt() as interrupt:
        for _ in range(cfg.max_steps):
            t0 = time.perf_counter()
            out = trainer.train_step(interrupt)
            times.append(time.perf_counter() - t0)
            losses.append(out["loss"])
    peak = vm_hwm_mb()
    evaluation = trainer.evaluate()
    return {**spec, "weights_mb": weights, "baseline_rss_mb": baseline, "setup_rss_mb": setup,
            "peak_train_rss_mb": peak, "process_peak_mb": max(setup_peak, peak),
            "step_s": statistics.median(times[1:] or times), "train_losses": losses,
            "eval_loss": evaluation["eval_loss"], "summary": trainable.summary, "tokens_per_step": out["tokens"]}


def layer_row(spec: dict) -> dict:
    """fwd+bwd of x (2048, in) through one frozen linear: dense, QuantLinear (nf4 + double quant), Linear4bit."""
    import torch

    from lorakit.quant import quantize_model

    torch.manual_seed(0)
    tokens, shapes = (64, [(64, 64)]) if spec["smoke"] else (2048, [(576, 576), (192, 576), (1536, 576)])
    results = []
    for out_f, in_f in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(tokens, in_f, dtype=dtype, requires_grad=True)
            cell = {"shape": f"{tokens}x{in_f}x{out_f}", "dtype": str(dtype).removeprefix("torch.")}
            for backend in ("dense", "lorakit", "bnb"):
                layer = torch.nn.Sequential(torch.nn.Linear(in_f, out_f, bias=False)).requires_grad_(False)
                if backend != "dense":
                    quantize_model(layer, backend=backend, compute_dtype=dtype)
                else:
                    layer.to(dtype)
                cell[backend + "_ms"] = best_ms(lambda: layer(x).sum().backward())
            results.append(cell)
    return {**spec, "layers": results}


def best_ms(fn, reps: int = 5, rounds: int = 5) -> float:
    """Best mean over `rounds` of `reps` calls: the least-disturbed estimate on a shared machine."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t0) / reps * 1e3)
    return best


# ---------------------------------------------------------------- the parent: rows, table, JSON


def markdown(rows: list[dict]) -> str:
    train = [r for r in rows if r.get("kind") == "train" and "error" not in r]
    lora = {r["precision"]: r for r in train if r["method"] == "lora"}
    lines = []
    for r in train:
        ref = lora.get(r["precision"])
        rel = (r["eval_loss"] / ref["eval_loss"] - 1) * 100 if ref else None
        method = "LoRA" if r["method"] == "lora" else f"QLoRA nf4+dq ({r['backend']})"
        working = r["peak_train_rss_mb"] - r["setup_rss_mb"]  # activations, gradients, optimizer state
        lines.append([method, r["precision"], r["weights_mb"], working, r["weights_mb"] + working,
                      r["setup_rss_mb"], r["peak_train_rss_mb"], r.get("process_peak_mb"), r["step_s"], r["eval_loss"],
                      None if rel is None else f"{rel:+.1f}%"])
    text = common.table(["method", "precision", "weights MiB", "training working set MB",
                         "weights + working set MB", "RSS after setup MB", "peak train RSS MB", "process peak MB",
                         "step s", "eval loss", "eval loss vs LoRA"], lines)
    layer = next((r for r in rows if r.get("kind") == "layer" and "layers" in r), None)
    if layer:
        text += "\n\n" + common.table(["linear fwd+bwd", "dtype", "dense ms", "lorakit QuantLinear ms",
                                       "bitsandbytes Linear4bit ms"],
                                      [[c["shape"], c["dtype"], c["dense_ms"], c["lorakit_ms"], c["bnb_ms"]]
                                       for c in layer["layers"]])
    errors = [f"- {r.get('method', r['kind'])} {r.get('precision', '')}: {r['error']}" for r in rows if "error" in r]
    return text + ("\n\nerrors:\n" + "\n".join(errors) if errors else "")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.setup_path()
    if args.row:
        spec = json.loads(args.row)
        common.emit_row(layer_row(spec) if spec["kind"] == "layer" else train_row(spec))
        return 0
    if args.render:
        path = common.RESULTS_DIR / f"{NAME}.json"
        saved = json.loads(path.read_text())
        text = markdown(saved["rows"])
        print(text)
        common.write_results(NAME, {k: v for k, v in saved.items() if k != "markdown"}, text)
        return 0
    rows = []
    for spec in row_specs(args):
        if args.smoke:  # in-process: seconds instead of a fresh interpreter per row (RSS is then not per row)
            rows.append(layer_row(spec) if spec["kind"] == "layer" else train_row(spec))
        else:
            rows.append(common.run_row(Path(__file__).resolve(), spec))
        print(f"row {len(rows)}: {json.dumps({k: v for k, v in rows[-1].items() if k != 'layers'})[:300]}",
              file=sys.stderr, flush=True)
    text = markdown(rows)
    print(text)
    machine = common.machine()
    print("\n" + common.describe_machine(machine))
    path = common.write_results(NAME + ("_smoke" if args.smoke else ""), {"machine": machine, "rows": rows}, text)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
