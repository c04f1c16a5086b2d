"""`make demo`: the whole loop on the embedded default model, in about ten minutes on a laptop CPU.

1. ask SmolLM2-135M-Instruct the held-out questions of the demo knowledge base (demo/data/kb_heldout.json:
   paraphrases that never appear in training) and lorakit's general probes (lorakit/data/retention_probes.json:
   everyday facts, sums, words, instructions), and score its greedy answers;
2. train a LoRA adapter on demo/data/kb_train.json with demo/train.yaml (`lorakit train` does the same), which
   mixes in the base model's own answers to general prompts (self-replay) so the adapter keeps what it knew;
3. ask both again with the adapter, and print the before/after table (KB score, retention, KL), a few answers,
   where the adapter went, and how to chat with it.

`python -m lorakit.demo [key=value ...]` overrides keys of demo/train.yaml (e.g. num_train_epochs=1).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from .chat import stop_token_ids
from .data import get_template, load_records
from .device import autocast_dtype, pick_device
from .evaluate import evaluate_models, format_table, items_from_records
from .lora import LoraModel
from .metrics import wilson_interval
from .models import load_model
from .retention import ask, load_probes, retention_of
from .train import load_config, train

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "demo" / "train.yaml"
HELDOUT = "kb_heldout"
SHOWN = 4  # example answers printed under the table
GENERAL = "What is the capital of France?"  # the general question shown before and after (a retention probe)


def say(text: str = "") -> None:
    print(text, flush=True)


def held_out_items(dataset_dir: str):
    return items_from_records(load_records(HELDOUT, dataset_dir=dataset_dir))


def score(model, tokenizer, items, names: list[str], template: str | None, bf16: bool) -> list[dict]:
    """Greedy answers to every held-out question, under bf16 autocast where the hardware has it."""
    render = get_template(template, tokenizer).prompt_ids if template else None
    device = next(model.parameters()).device
    amp = autocast_dtype(device, bf16, False)
    with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        return evaluate_models(model, tokenizer, names, items, max_new_tokens=40, batch_size=len(items), render=render)


def probe_answers(model, tokenizer, probes, name: str, template: str | None, bf16: bool, base=None):
    """The probes' greedy answers of `name`; with `base` (the base's answers), also its retention and KL."""
    bound = get_template(template, tokenizer)
    stop = stop_token_ids(tokenizer, model, bound.stop_words)
    device = next(model.parameters()).device
    amp = autocast_dtype(device, bf16, False)
    with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        if base is None:
            return ask(model, tokenizer, probes, name, bound.prompt_ids, stop, batch_size=len(probes))
        return retention_of(model, tokenizer, name, base, probes, bound.prompt_ids, stop, batch_size=len(probes))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    cfg, _ = load_config(CONFIG, argv)
    # relative paths in demo/train.yaml are relative to the repository, wherever `make demo` is run from
    cfg.dataset_dir = str((ROOT / cfg.dataset_dir).resolve()) if not Path(cfg.dataset_dir).is_absolute() else \
        cfg.dataset_dir
    items = held_out_items(cfg.dataset_dir)
    say(f"lorakit demo: {len(items)} held-out questions about Tarnwick Marine Instruments (a fictional company), "
        "none of them seen in training")

    say("\n[1/3] the base model answers the held-out questions")
    model, tokenizer, _ = load_model(cfg.model_name_or_path, dtype="float32", device=pick_device(cfg.device))
    before = score(model, tokenizer, items, ["__base__"], cfg.template, cfg.bf16)[0]
    say(f"      contains the right fact: {before['contains']:.0%} ({before['seconds']:.0f} s)")
    start, probes = time.perf_counter(), load_probes()
    base_probes = probe_answers(model, tokenizer, probes, "__base__", cfg.template, cfg.bf16)
    say(f"      and {len(probes)} general probes (facts, sums, words, instructions): {sum(base_probes.right)} right "
        f"({time.perf_counter() - start:.0f} s)")

    say(f"\n[2/3] training a LoRA adapter: lorakit train {CONFIG.relative_to(ROOT)} " + " ".join(argv))
    results = train(cfg)
    if results.get("status") != "completed":
        say("lorakit demo: training was interrupted; run `make demo` again to start over")
        return 130

    say("\n[3/3] the same questions with the adapter")
    lora = LoraModel.from_pretrained(model, cfg.output_dir, adapter_name="demo")
    after = score(lora, tokenizer, items, ["demo"], cfg.template, cfg.bf16)[0]
    kept, adapter_probes = probe_answers(lora, tokenizer, probes, "demo", cfg.template, cfg.bf16, base_probes)
    after.update(kept)
    before["model"], after["model"] = "SmolLM2-135M-Instruct", f"+ adapter ({cfg.output_dir})"
    general = [p.prompt for p in probes].index(GENERAL)
    shown = (GENERAL, base_probes.texts[general], adapter_probes.texts[general])
    report(items, before, after, results, cfg, time.perf_counter() - started, shown)
    return 0


def report(items, before: dict, after: dict, results: dict, cfg, seconds: float, general: tuple) -> None:
    columns = ("model", "n", "contains", "exact_match", "rouge_l", "retention", "kl")
    say("\n" + format_table([{k: r[k] for k in columns if k in r} for r in (before, after)]))
    say(f"retention: the adapter still answers {after['kept']} of the {after['base_right']} general probes the base "
        f"answers right (95 % interval {percent_range(after['retention_95'])}); kl: mean KL(base || adapter) per "
        f"token of the base's answers")
    say("\nexamples (held-out question -> answer before | after):")
    for i in range(0, len(items), max(len(items) // SHOWN, 1))[:SHOWN]:
        say(f"  Q: {items[i].prompt[-1]['content']}")
        say(f"     before: {before['answers'][i][:100]}")
        say(f"     after:  {after['answers'][i][:100]}")
    question, base_answer, adapter_answer = general
    say("and a general question (a retention probe, nothing to do with Tarnwick):")
    say(f"  Q: {question}")
    say(f"     before: {base_answer[:100]}")
    say(f"     after:  {adapter_answer[:100]}")
    right = round(after["contains"] * len(items))  # contains is 0 or 1 per question
    summary = {"heldout_contains_before": before["contains"], "heldout_contains_after": after["contains"],
               "rouge_l_before": before["rouge_l"], "rouge_l_after": after["rouge_l"],
               "heldout_95": wilson_interval(right, len(items)),
               "retention": after["retention"], "retention_95": after["retention_95"], "retention_kept": after["kept"],
               "retention_base_right": after["base_right"], "kl": after["kl"],
               "train_runtime_s": results.get("train_runtime"),
               "train_tokens_per_second": results.get("train_tokens_per_second"), "total_seconds": round(seconds, 1)}
    out = Path(cfg.output_dir)
    (out / "demo_results.json").write_text(json.dumps(summary, indent=2) + "\n")
    say(f"\nheld-out score (answer contains the fact): {before['contains']:.0%} -> {after['contains']:.0%} "
        f"(95 % interval {percent_range(summary['heldout_95'])}); retention {after['retention']:.0%}; demo took "
        f"{seconds / 60:.1f} min")
    say(f"adapter (PEFT format): {out}/adapter_model.safetensors, with its config, tokenizer and loss curve")
    say(f"chat with it:          .venv/bin/lorakit chat --adapter {out}")


def percent_range(interval: tuple[float, float]) -> str:
    """(0.730, 0.879) -> "73-88 %"."""
    low, high = interval
    return f"{100 * low:.0f}-{100 * high:.0f} %"


if __name__ == "__main__":
    raise SystemExit(main())
