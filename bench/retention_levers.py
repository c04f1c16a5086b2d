"""What each lever does to the demo's trade-off: held-out KB score against retention of general ability.

Every lever is `demo/train.yaml` plus overrides that set the replay keys themselves, trained on the demo data with
`lorakit train` and scored like `make demo` scores (bf16 autocast where the CPU has it): the share of the 120
held-out KB paraphrases whose greedy answer contains the fact, and retention and KL on lorakit's general probe set
(`lorakit.retention`). The base model's answers are computed once. Results go to bench/results/retention.json after
every lever (a rerun with --only replaces those levers and keeps the others). Not part of `make bench`: each lever
trains for minutes.

    python bench/retention_levers.py                       # every lever (5-15 min each on this machine)
    python bench/retention_levers.py --only kl1-lr2e-3,self-0.5-kl1  # some of them
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import common

NAME = "retention"

# (name, the lever it moves, overrides of demo/train.yaml)
# every lever sets the replay keys itself, so it means the same whatever demo/train.yaml holds today
OFF = ["self_replay=false", "replay_ratio=0", "replay_kl_weight=0"]  # no replay
BASE = ["learning_rate=3e-3", "num_train_epochs=5", *OFF]  # the first demo recipe; rank 16, all linear layers
SELF = ["self_replay=true", "replay_kl_weight=0"]  # self-replay rows learn their labels only (KL levers override)
FAST = ["num_train_epochs=3", "per_device_train_batch_size=4"]  # as many updates as 6 epochs of 8, half the tokens
SHORT = ["self_replay_max_new_tokens=32"]
CUT48 = ["self_replay_max_new_tokens=48"]
LEVERS = [  # in the order they run
    ("recipe-0", "the first demo recipe: lr 3e-3, 5 epochs, rank 16, all linear layers", BASE),
    ("self-0.3-fast", "self-replay 30 % (answers <= 32 tokens), 3 epochs of batch 4",
     ["learning_rate=3e-3", *FAST, *SELF, *SHORT, "replay_ratio=0.3"]),
    ("self-0.5-fast", "self-replay 50 % (answers <= 32 tokens), 3 epochs of batch 4",
     ["learning_rate=3e-3", *FAST, *SELF, *SHORT, "replay_ratio=0.5"]),
    ("self-0.5-fast-cut48", "self-replay 50 % (answers <= 48 tokens, cut after the last whole sentence), 3 epochs of "
     "batch 4", ["learning_rate=3e-3", *FAST, *SELF, "self_replay_max_new_tokens=48", "replay_ratio=0.5"]),
    ("self-0.7-fast-cut48", "self-replay 70 % (answers <= 48 tokens, cut after the last whole sentence), 3 epochs of "
     "batch 4", ["learning_rate=3e-3", *FAST, *SELF, "self_replay_max_new_tokens=48", "replay_ratio=0.7"]),
    ("fast", "3 epochs of batch 4, no replay", ["learning_rate=3e-3", *FAST, *OFF]),
    ("epochs-3", "3 epochs", ["learning_rate=3e-3", "num_train_epochs=3", *OFF]),
    ("lr-1e-3", "learning rate 1e-3", ["learning_rate=1e-3", "num_train_epochs=5", *OFF]),
    ("self-0.3-3ep", "self-replay 30 %, 3 epochs", ["learning_rate=3e-3", "num_train_epochs=3", *SELF,
                                                   "replay_ratio=0.3"]),
    ("self-0.5-3ep", "self-replay 50 %, 3 epochs", ["learning_rate=3e-3", "num_train_epochs=3", *SELF,
                                                   "replay_ratio=0.5"]),
    ("rank-4", "rank 4 (alpha 8)", BASE + ["lora_rank=4", "lora_alpha=8"]),
    ("attn-only", "LoRA on q, k, v, o only", BASE + ["lora_target=q_proj,k_proj,v_proj,o_proj"]),
    ("self-0.5", "self-replay 50 %, 5 epochs", BASE + SELF + ["replay_ratio=0.5"]),
    ("self-0.5-lr1e-3", "self-replay 50 % (cut48), 3 epochs of batch 4, learning rate 1e-3",
     ["learning_rate=1e-3", *FAST, *SELF, *CUT48, "replay_ratio=0.5"]),
    ("self-0.5-pool704", "self-replay 50 % (cut48) from the 704-prompt pool, 3 epochs of batch 4",
     ["learning_rate=3e-3", *FAST, *SELF, *CUT48, "replay_ratio=0.5"]),
    ("self-0.5-kl0.5", "self-replay 50 % (cut48), 3 epochs of batch 4, KL to the base on replay rows, weight 0.5",
     ["learning_rate=3e-3", *FAST, *SELF, *CUT48, "replay_ratio=0.5", "replay_kl_weight=0.5"]),
    ("self-0.5-kl1", "self-replay 50 % (cut48), 3 epochs of batch 4, KL to the base on replay rows, weight 1",
     ["learning_rate=3e-3", *FAST, *SELF, *CUT48, "replay_ratio=0.5", "replay_kl_weight=1.0"]),
    ("self-0.5-lr1e-3-kl1", "self-replay 50 % (cut48), 3 epochs of batch 4, learning rate 1e-3, KL weight 1",
     ["learning_rate=1e-3", *FAST, *SELF, *CUT48, "replay_ratio=0.5", "replay_kl_weight=1.0"]),
    ("kl1-lr2e-3", "self-replay 50 % (cut48), 3 epochs of batch 4, learning rate 2e-3, KL weight 1",
     ["learning_rate=2e-3", *FAST, *SELF, *CUT48, "replay_ratio=0.5", "replay_kl_weight=1.0"]),
    ("kl1-lr1e-3-5ep-0.3", "self-replay 30 % (cut48), 5 epochs of batch 4, learning rate 1e-3, KL weight 1",
     ["learning_rate=1e-3", "num_train_epochs=5", "per_device_train_batch_size=4", *SELF, *CUT48,
      "replay_ratio=0.3", "replay_kl_weight=1.0"]),
    ("kl1-lr1e-3-mlp", "self-replay 50 % (cut48), 3 epochs of batch 4, learning rate 1e-3, KL weight 1, LoRA on "
     "gate, up, down only", ["learning_rate=1e-3", *FAST, *SELF, *CUT48, "replay_ratio=0.5", "replay_kl_weight=1.0",
                             "lora_target=gate_proj,up_proj,down_proj"]),
    ("kl1-b8-lr2e-3", "self-replay 50 % (cut48), 3 epochs of batch 8, learning rate 2e-3, KL weight 1",
     ["learning_rate=2e-3", "num_train_epochs=3", "per_device_train_batch_size=8", *SELF, *CUT48,
      "replay_ratio=0.5", "replay_kl_weight=1.0"]),
    ("kl1-lr1.5e-3", "self-replay 50 % (cut48), 3 epochs of batch 4, learning rate 1.5e-3, KL weight 1",
     ["learning_rate=1.5e-3", *FAST, *SELF, *CUT48, "replay_ratio=0.5", "replay_kl_weight=1.0"]),
    ("kl1-lr2e-3-0.3", "self-replay 30 % (cut48), 3 epochs of batch 4, learning rate 2e-3, KL weight 1",
     ["learning_rate=2e-3", *FAST, *SELF, *CUT48, "replay_ratio=0.3", "replay_kl_weight=1.0"]),
    ("kl1-attn", "self-replay 50 % (cut48), 3 epochs of batch 4, KL weight 1, LoRA on q, k, v, o only",
     ["learning_rate=3e-3", *FAST, *SELF, *CUT48, "replay_ratio=0.5", "replay_kl_weight=1.0",
      "lora_target=q_proj,k_proj,v_proj,o_proj"]),
    ("kl1-mlp", "self-replay 50 % (cut48), 3 epochs of batch 4, KL weight 1, LoRA on gate, up, down only",
     ["learning_rate=3e-3", *FAST, *SELF, *CUT48, "replay_ratio=0.5", "replay_kl_weight=1.0",
      "lora_target=gate_proj,up_proj,down_proj"]),
    ("self-0.5-r4", "self-replay 50 % (cut48), 3 epochs of batch 4, rank 4 (alpha 8)",
     ["learning_rate=3e-3", *FAST, *SELF, *CUT48, "replay_ratio=0.5", "lora_rank=4", "lora_alpha=8"]),
    ("alpaca-0.3-3ep", "replay_dataset alpaca_en_demo 30 %, 3 epochs",
     ["learning_rate=3e-3", "num_train_epochs=3", "self_replay=false", "replay_kl_weight=0",
      "replay_dataset={alpaca}", "replay_ratio=0.3"]),
]
EVAL_BATCH = 192  # every prompt of a set in one batch: fewer sequential decoding steps


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help="comma-separated lever names")
    p.add_argument("--work", default=str(common.ROOT / "saves" / "bench-retention"), help="adapters go here")
    p.add_argument("--reuse", action="store_true", help="score an adapter already trained in --work, do not retrain")
    return p.parse_args(argv)


def score_base(model, tokenizer, items, template, bf16: bool, probes):
    import torch

    from lorakit import demo, retention
    from lorakit.chat import stop_token_ids
    from lorakit.data import get_template
    from lorakit.device import autocast_dtype

    bound = get_template(template, tokenizer)
    stop = stop_token_ids(tokenizer, model, bound.stop_words)
    kb = demo.score(model, tokenizer, items, ["__base__"], template, bf16)[0]
    device = next(model.parameters()).device
    amp = autocast_dtype(device, bf16, False)
    with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        answers = retention.ask(model, tokenizer, probes, "__base__", bound.prompt_ids, stop, batch_size=EVAL_BATCH)
    return kb, answers, bound, stop


def score_adapter(lora, tokenizer, name, items, cfg, base_answers, probes, bound, stop) -> dict:
    import torch

    from lorakit import demo, retention
    from lorakit.device import autocast_dtype

    kb = demo.score(lora, tokenizer, items, [name], cfg.template, cfg.bf16)[0]
    device = next(lora.parameters()).device
    amp = autocast_dtype(device, cfg.bf16, False)
    with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        kept, _ = retention.retention_of(lora, tokenizer, name, base_answers, probes, bound.prompt_ids, stop,
                                         batch_size=EVAL_BATCH)
    return {"kb_contains": kb["contains"], **kept}


def run_lever(name: str, overrides: list[str], args, model, tokenizer, items, base_answers, probes, bound,
              stop) -> dict:
    from lorakit import demo
    from lorakit.lora import LoraModel
    from lorakit.train import load_config, train

    out = Path(args.work) / name
    cfg, _ = load_config(demo.CONFIG, overrides + [f"output_dir={out}", "plot_loss=false"])
    cfg.dataset_dir = str(demo.ROOT / cfg.dataset_dir)
    start = time.perf_counter()
    done = out / "train_results.json"
    if args.reuse and done.is_file():  # trained by an earlier run of this script: score it only
        results = json.loads(done.read_text())
    else:
        results = train(cfg)
    trained = time.perf_counter() - start
    adapter = name.replace(".", "_").replace("-", "_")  # a module name: no dots
    lora = LoraModel.from_pretrained(model, out, adapter_name=adapter)
    row = score_adapter(lora, tokenizer, adapter, items, cfg, base_answers, probes, bound, stop)
    lora.unload()
    return {"name": name, "overrides": overrides, **row, "steps": results.get("global_step"),
            "train_runtime_s": results.get("train_runtime"), "train_seconds_with_setup": round(trained, 1),
            "tokens_per_second": results.get("train_tokens_per_second")}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.setup_path()
    from lorakit import demo, retention
    from lorakit.models import load_model

    levers = LEVERS
    if args.only:
        wanted = set(args.only.split(","))
        levers = [lever for lever in levers if lever[0] in wanted]
    cfg, _ = demo.load_config(demo.CONFIG, [])
    items = demo.held_out_items(str(demo.ROOT / cfg.dataset_dir))
    probes = retention.load_probes()
    model, tokenizer, _ = load_model(None, dtype="float32")
    kb, base_answers, bound, stop = score_base(model, tokenizer, items, cfg.template, cfg.bf16, probes)
    path = common.results_dir(False) / f"{NAME}.json"
    previous = json.loads(path.read_text()) if path.is_file() and args.only else {}
    runs = {r["name"]: r for r in previous.get("runs", [])}
    payload = {"machine": common.machine(), "config": str(demo.CONFIG.relative_to(common.ROOT)),
               "base": {"kb_contains": kb["contains"], "probes": len(probes), "base_right": sum(base_answers.right)}}
    for name, lever, overrides in levers:
        if any("{alpaca}" in o for o in overrides):  # LLaMA-Factory's alpaca_en_demo, fetched once (bench/common)
            overrides = [o.replace("{alpaca}", str(common.alpaca_en_demo())) for o in overrides]
        print(f"--- {name}: {lever}", file=sys.stderr, flush=True)
        row = run_lever(name, overrides, args, model, tokenizer, items, base_answers, probes, bound, stop)
        runs[name] = {**row, "lever": lever}
        payload["runs"] = [runs[n] for n, _, _ in LEVERS if n in runs]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2) + "\n")
        print(json.dumps(runs[name]), flush=True)
    print(markdown(payload))
    return 0


def markdown(payload: dict) -> str:
    rows = [["base model", "", f"{payload['base']['kb_contains']:.0%}", "100 %", "0", ""]]
    for r in payload.get("runs", []):
        rows.append([r["name"], r["lever"], f"{r['kb_contains']:.0%}", f"{r['retention']:.0%} ({r['kept']}/"
                     f"{r['base_right']})", f"{r['kl']:.3f}", f"{r['train_runtime_s']:.0f}"])
    return common.table(["lever", "what changes", "held-out KB", "retention", "KL", "train s"], rows)


if __name__ == "__main__":
    raise SystemExit(main())
