"""What each lever does to the demo's trade-off: held-out KB score against retention of general ability.

Every lever is `demo/train.yaml` plus overrides that set the replay keys themselves, trained on the demo data with
`lorakit train` and scored like `make demo` scores (bf16 autocast where the CPU has it): the share of the 120
held-out KB paraphrases whose greedy answer contains the fact, and retention and KL on lorakit's general probe set
(`lorakit.retention`). The base model's answers are computed once. Results go to bench/results/retention.json after
every lever (a rerun with --only replaces those levers and keeps the others). Not part of `make bench`: each lever
trains for minutes.

    python bench/retention_levers.py                       # every lever (5-15 min each on this machine)
    python bench/retention_levers.py --only kl1-lr2e-3,self-0.5-kl1  # some of them
    python bench/retention_levers.py --calibrate saves/bench-retention/kl1-lr1e-3-5ep-0.3 [--fp32]  # noise floor

--calibrate measures the metric itself: how close the base's right answers are to a tie at their deciding tokens, and
what retention an adapter's update scaled down, or replaced by a random direction of the same size, keeps
(bench/results/retention_calibration*.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import common
import kb_variants

NAME = "retention"

# (name, the lever it moves, overrides of demo/train.yaml)
# every lever sets the replay keys itself, so it means the same whatever demo/train.yaml holds today
OFF = ["self_replay=false", "replay_ratio=0", "replay_kl_weight=0"]  # no replay
BASE = ["learning_rate=3e-3", "num_train_epochs=5", *OFF]  # the first demo recipe; rank 16, all linear layers
SELF = ["self_replay=true", "replay_kl_weight=0"]  # self-replay rows learn their labels only (KL levers override)
FAST = ["num_train_epochs=3", "per_device_train_batch_size=4"]  # as many updates as 6 epochs of 8, half the tokens
SHORT = ["self_replay_max_new_tokens=32"]
CUT48 = ["self_replay_max_new_tokens=48"]
# the demo recipe of 2026-12-01 (kl1-lr1e-3-5ep-0.3); the levers after it change one or two of its keys
DEMO = {"learning_rate": "1e-3", "num_train_epochs": "5", "per_device_train_batch_size": "4", "self_replay": "true",
        "self_replay_max_new_tokens": "48", "replay_ratio": "0.3", "replay_kl_weight": "1.0"}


# demo/train.yaml's keys that changed after these levers were defined, set back under every lever's own overrides
# (the 360-pair data, lr 1e-3 over 5 epochs, no null space), so each lever means what it meant when it was measured
BEFORE = ["dataset_dir={kb:base6}", "learning_rate=1e-3", "num_train_epochs=5", "replay_null_space=0"]


def demo_with(**changes: str) -> list[str]:
    """The demo recipe's overrides with some keys changed."""
    return [f"{k}={v}" for k, v in {**DEMO, **changes}.items()]


# today's demo/train.yaml against DEMO: 12 phrasings per fact, 3 epochs at lr 3e-3, null space 0.99
TODAY = {"num_train_epochs": "3", "learning_rate": "3e-3", "dataset_dir": "{kb:div12}", "replay_null_space": "0.99"}


def today_with(**changes: str) -> list[str]:
    """Today's demo recipe's overrides with some keys changed."""
    return demo_with(**{**TODAY, **changes})


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
    ("demo-sr96", "the demo recipe, self-replay answers up to 96 tokens", demo_with(self_replay_max_new_tokens="96")),
    ("demo-sr64", "the demo recipe, self-replay answers up to 64 tokens", demo_with(self_replay_max_new_tokens="64")),
    ("demo-r4", "the demo recipe at rank 4 (alpha 8)", demo_with(lora_rank="4", lora_alpha="8")),
    ("demo-attn", "the demo recipe, LoRA on q, k, v, o only", demo_with(lora_target="q_proj,k_proj,v_proj,o_proj")),
    ("demo-2ep-lr2e-3", "the demo recipe in 2 epochs at lr 2e-3",
     demo_with(num_train_epochs="2", learning_rate="2e-3")),
    ("demo-0.5-4ep-lr1.5e-3", "the demo recipe with self-replay 50 %, 4 epochs at lr 1.5e-3",
     demo_with(replay_ratio="0.5", num_train_epochs="4", learning_rate="1.5e-3")),
    ("demo-alpaca-prompts", "the demo recipe, self-replay of the base's answers to alpaca_en_demo's instructions",
     demo_with(replay_dataset="{alpaca}")),
    ("demo-b8-4ep-lr1.5e-3", "the demo recipe in 4 epochs of batch 8 at lr 1.5e-3 (a ~4-minute demo)",
     demo_with(per_device_train_batch_size="8", num_train_epochs="4", learning_rate="1.5e-3")),
    ("demo-b8-4ep-lr2e-3", "the demo recipe in 4 epochs of batch 8 at lr 2e-3 (a ~4-minute demo)",
     demo_with(per_device_train_batch_size="8", num_train_epochs="4", learning_rate="2e-3")),
    ("demo-null-0.9", "the demo recipe, LoRA's A kept orthogonal to the inputs holding 90 % of the replay rows' "
     "energy (replay_null_space)", demo_with() + ["replay_null_space=0.9"]),
    ("demo-null-0.99", "the demo recipe, LoRA's A kept orthogonal to the inputs holding 99 % of the replay rows' "
     "energy (replay_null_space)", demo_with() + ["replay_null_space=0.99"]),
    ("demo-null-0.99-lr1.5e-3", "the demo recipe at lr 1.5e-3, LoRA's A kept orthogonal to the inputs holding 99 % "
     "of the replay rows' energy", demo_with(learning_rate="1.5e-3") + ["replay_null_space=0.99"]),
    ("demo-null-0.99-lr2e-3", "the demo recipe at lr 2e-3, LoRA's A kept orthogonal to the inputs holding 99 % "
     "of the replay rows' energy", demo_with(learning_rate="2e-3") + ["replay_null_space=0.99"]),
    ("demo-kl0.75", "the demo recipe with replay_kl_weight 0.75 (a quarter of the replay loss on the greedy labels)",
     demo_with(replay_kl_weight="0.75")),
    ("demo-alpaca-data-kl1", "the demo recipe replaying alpaca_en_demo's own records (not the base's answers), KL 1",
     demo_with(self_replay="false", replay_dataset="{alpaca}")),
    ("demo-dropout0.1", "the demo recipe with lora_dropout 0.1", demo_with(lora_dropout="0.1")),
    ("demo-fresh-replay", "the demo recipe as one epoch of the KB data 5 times: 771 distinct replay rows, not 154 "
     "5 times", demo_with(num_train_epochs="1", dataset_dir="{kb:rep5}")),
    ("demo-div10-3ep", "the demo recipe on 10 questions and 4 replies per fact (599 pairs), 3 epochs",
     demo_with(num_train_epochs="3", dataset_dir="{kb:div10}")),
    ("demo-div12-3ep", "the demo recipe on 12 questions and 4 replies per fact (681 pairs), 3 epochs",
     demo_with(num_train_epochs="3", dataset_dir="{kb:div12}")),
    ("demo-div12-null-0.99", "12 questions and 4 replies per fact, 3 epochs, LoRA's A kept orthogonal to the "
     "inputs holding 99 % of the replay rows' energy", demo_with(num_train_epochs="3", dataset_dir="{kb:div12}")
     + ["replay_null_space=0.99"]),
    ("demo-div12-null-0.99-lr2e-3", "12 questions and 4 replies per fact, 3 epochs at lr 2e-3, LoRA's A kept "
     "orthogonal to the inputs holding 99 % of the replay rows' energy",
     demo_with(num_train_epochs="3", learning_rate="2e-3", dataset_dir="{kb:div12}") + ["replay_null_space=0.99"]),
    ("demo-div12-null-0.99-lr3e-3", "12 questions and 4 replies per fact, 3 epochs at lr 3e-3, LoRA's A kept "
     "orthogonal to the inputs holding 99 % of the replay rows' energy",
     demo_with(num_train_epochs="3", learning_rate="3e-3", dataset_dir="{kb:div12}") + ["replay_null_space=0.99"]),
    ("demo-div10-null-0.99-lr2e-3", "10 questions and 4 replies per fact, 3 epochs at lr 2e-3, LoRA's A kept "
     "orthogonal to the inputs holding 99 % of the replay rows' energy",
     demo_with(num_train_epochs="3", learning_rate="2e-3", dataset_dir="{kb:div10}") + ["replay_null_space=0.99"]),
    ("demo-div12-null-0.99-lr4e-3", "12 questions and 4 replies per fact, 3 epochs at lr 4e-3, replay_null_space "
     "0.99", today_with(learning_rate="4e-3")),
    ("demo-div12-null-0.995-lr3e-3", "12 questions and 4 replies per fact, 3 epochs at lr 3e-3, replay_null_space "
     "0.995", today_with(replay_null_space="0.995")),
    ("demo-div12-null-0.99-lr2e-3-key", "demo-div12-null-0.99-lr2e-3 again, on the replay_null_space key",
     today_with(learning_rate="2e-3")),
    ("demo-div12-null-0.99-lr3e-3-key", "demo-div12-null-0.99-lr3e-3 again, on the replay_null_space key",
     today_with()),
    ("demo-div12-task16-lr3e-3", "12 questions and 4 replies per fact, 3 epochs at lr 3e-3, replay_task_directions "
     "16", today_with(replay_null_space="0", replay_task_directions="16")),
    ("demo-div12-task64-lr3e-3", "12 questions and 4 replies per fact, 3 epochs at lr 3e-3, replay_task_directions "
     "64", today_with(replay_null_space="0", replay_task_directions="64")),
    ("demo-div12-task16-lr3e-3-rw3", "demo-div12-task16-lr3e-3 with every replay token's loss counted 3 times "
     "(replay_loss_weight 3)", today_with(replay_null_space="0", replay_task_directions="16", replay_loss_weight="3")),
    *[(f"demo-div12-null-0.99-lr3e-3-rw{w}", "the demo recipe (12 phrasings, null space 0.99, lr 3e-3) with every "
       f"replay token's loss counted {w} times (replay_loss_weight {w})", today_with(replay_loss_weight=w))
      for w in ("3", "10", "5")],
    *[(f"demo-div12-null-0.99-lr{lr}-rw3", f"demo-div12-null-0.99-lr3e-3-rw3 at lr {lr}",
       today_with(learning_rate=lr, replay_loss_weight="3")) for lr in ("3.5e-3", "4e-3")],
    ("demo-div12-null-0.99-lr3e-3-rw2", "the demo recipe (12 phrasings, null space 0.99, lr 3e-3) with every "
     "replay token's loss counted twice (replay_loss_weight 2)", today_with(replay_loss_weight="2")),
    ("demo-div12-null-0.99-lr3e-3-rw3-seed1", "demo-div12-null-0.99-lr3e-3-rw3 with seed 1 (another draw of the "
     "replay rows, the shuffles and A's start)", today_with(replay_loss_weight="3", seed="1")),
    *[(f"demo-div12-null-0.99-mlp-lr{lr}", f"the demo recipe with LoRA on gate, up and down only, lr {lr}",
       today_with(lora_target="gate_proj,up_proj,down_proj", learning_rate=lr)) for lr in ("4e-3",)],
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
    p.add_argument("--calibrate", metavar="ADAPTER", help="the metric's noise floor instead of levers: margins of the "
                   "base's deciding tokens, and ADAPTER's update scaled down and replaced by random directions "
                   "(results: bench/results/retention_calibration.json)")
    p.add_argument("--fp32", action="store_true", help="with --calibrate: score without bf16 autocast "
                   "(results: retention_calibration_fp32.json)")
    p.add_argument("--variants", help="with --calibrate: comma-separated variant names (default: all; none: the "
                   "base's numbers only, earlier variants kept)")
    args = p.parse_args(argv)
    names = {n for n, _, _ in VARIANTS} | {"none"}
    unknown = sorted(set(args.variants.split(",")) - names) if args.variants else []
    if unknown:
        p.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(sorted(names))}")
    return args


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
        kept, answers = retention.retention_of(lora, tokenizer, name, base_answers, probes, bound.prompt_ids, stop,
                                               batch_size=EVAL_BATCH)
    return {"kb_contains": kb["contains"], **kept, "_right": answers.right}


def kb_variant(override: str, root: Path) -> str:
    """`dataset_dir={kb:NAME}` -> the directory bench/kb_variants.py builds for variant NAME; others unchanged."""
    key, _, value = override.partition("=")
    if not (value.startswith("{kb:") and value.endswith("}")):
        return override
    return f"{key}={kb_variants.build(value[4:-1], root)}"


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
    right = row.pop("_right")
    row["lost"] = [i for i, (b, a) in enumerate(zip(base_answers.right, right)) if b and not a]  # probe indices
    lora.unload()
    return {"name": name, "overrides": overrides, **row, "steps": results.get("global_step"),
            "train_runtime_s": results.get("train_runtime"), "train_seconds_with_setup": round(trained, 1),
            "tokens_per_second": results.get("train_tokens_per_second")}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.setup_path()
    from lorakit import demo, retention
    from lorakit.models import load_model

    if args.calibrate:
        return calibrate(Path(args.calibrate), args.fp32, args.variants.split(",") if args.variants else None)

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
        overrides = [kb_variant(o, Path(args.work) / "data") for o in [*BEFORE, *overrides]]
        print(f"--- {name}: {lever}", file=sys.stderr, flush=True)
        row = run_lever(name, overrides, args, model, tokenizer, items, base_answers, probes, bound, stop)
        if args.reuse and name in runs:  # rescored only: the training time is the earlier run's
            row["train_seconds_with_setup"] = runs[name].get("train_seconds_with_setup")
        if args.only and path.is_file():  # rows another run of this script wrote meanwhile are kept
            runs = {r["name"]: r for r in json.loads(path.read_text()).get("runs", [])}
        runs[name] = {**row, "lever": lever}
        payload["runs"] = [runs[n] for n, _, _ in LEVERS if n in runs]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2) + "\n")
        print(json.dumps(runs[name]), flush=True)
    print(markdown(payload))
    return 0


# ---------------------------------------------------------------- the metric's noise floor (--calibrate)

SCALES = (0.1, 0.25, 0.5, 1.0)  # the adapter's update B A times s: same direction, smaller step
RANDOM = (0.25, 0.5, 1.0, 2.5)  # B replaced by Gaussian noise of the same Frobenius norm per module, times s
VARIANTS = [(f"scale-{s}", s, None) for s in SCALES] + [(f"random-{s}", s, 17) for s in RANDOM]  # (name, s, seed)
MARGINS = (0.5, 1.0, 2.0)  # log-probability gaps counted as near-ties


def deciding_length(tokenizer, ids: list[int], answers: list[str]) -> int:
    """The fewest answer tokens whose text already contains a keyword (the answer's deciding tokens)."""
    from lorakit.metrics import contains

    for k in range(1, len(ids) + 1):
        if contains(tokenizer.decode(ids[:k], skip_special_tokens=True), answers):
            return k
    return len(ids)


def base_margins(model, tokenizer, base, probes, bf16: bool) -> list[dict]:
    """Per base-right probe: the smallest top-1 minus top-2 log-probability over the deciding tokens, teacher-forced.

    margin_t = log P(v_1 | x_<t) - log P(v_2 | x_<t), v_1, v_2 the two likeliest tokens at answer position t;
    a probe whose margin is near 0 flips under any perturbation of the logits of that size.
    """
    import torch

    from lorakit.device import autocast_dtype

    device = next(model.parameters()).device
    amp = autocast_dtype(device, bf16, False)
    rows = []
    for i, probe in enumerate(probes):
        if not base.right[i]:
            continue
        k = deciding_length(tokenizer, base.ids[i], probe.answers)
        seq = torch.tensor([base.prompt_ids[i] + base.ids[i][:k]], device=device)  # (1, T)
        first = len(base.prompt_ids[i]) - 1
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = model(input_ids=seq).logits[0, first:first + k].float()  # (k, V)
        top = logits.log_softmax(-1).topk(2, dim=-1).values  # (k, 2)
        gap = top[:, 0] - top[:, 1]  # (k,)
        rows.append({"probe": i, "deciding_tokens": k, "min_margin": float(gap.min()),
                     "at": int(gap.argmin()), "answer_tokens": len(base.ids[i])})
    return rows


def scaled_adapter(src: Path, dst: Path, scale: float, random_seed: int | None) -> Path:
    """A copy of adapter `src` with every lora_B times `scale` (or Gaussian noise of B's norm times `scale`)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "adapter_config.json", dst / "adapter_config.json")
    state = load_file(src / "adapter_model.safetensors")
    gen = torch.Generator().manual_seed(random_seed) if random_seed is not None else None
    for key, value in state.items():
        if "lora_B" not in key:
            continue
        if gen is not None:
            noise = torch.randn(value.shape, generator=gen, dtype=torch.float32)
            value = noise * (value.float().norm() / noise.norm())
        state[key] = (value.float() * scale).to(value.dtype).contiguous()
    save_file(state, dst / "adapter_model.safetensors", metadata={"format": "pt"})
    return dst


def calibrate(adapter: Path, fp32: bool, wanted: list[str] | None) -> int:
    """Margins of the base's deciding tokens, and retention of scaled and random versions of `adapter`.

    With `fp32` every score runs without bf16 autocast (the base's answers too)."""
    import tempfile

    import torch

    from lorakit import demo, retention
    from lorakit.lora import LoraModel
    from lorakit.models import load_model

    cfg, _ = demo.load_config(demo.CONFIG, [])
    cfg.bf16 = cfg.bf16 and not fp32
    items = demo.held_out_items(str(demo.ROOT / cfg.dataset_dir))
    probes = retention.load_probes()
    model, tokenizer, _ = load_model(None, dtype="float32")
    kb, base, bound, stop = score_base(model, tokenizer, items, cfg.template, cfg.bf16, probes)
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=fp32)  # the other precision: flips from numerics alone
    with torch.no_grad(), amp:
        other = retention.ask(model, tokenizer, probes, "__base__", bound.prompt_ids, stop, batch_size=EVAL_BATCH)
    with torch.no_grad():
        margins = base_margins(model, tokenizer, base, probes, cfg.bf16)
    other_kept = retention.compare(base, other)
    payload = {"machine": common.machine(), "adapter": str(adapter), "scored_in": "fp32" if fp32 else "bf16 autocast",
               "base_right": sum(base.right), "flips_in_the_other_precision": other_kept["base_right"] -
               other_kept["kept"], "other_precision_lost": [i for i, (b, o) in enumerate(zip(base.right, other.right))
                                                            if b and not o], "base_kb_contains": kb["contains"],
               "near_ties": {str(m): sum(r["min_margin"] < m for r in margins) for m in MARGINS}, "margins": margins,
               "variants": []}
    lora = None
    with tempfile.TemporaryDirectory() as tmp:
        for name, scale, seed in [v for v in VARIANTS if wanted is None or v[0] in wanted]:
            path = scaled_adapter(adapter, Path(tmp) / name, scale, seed)
            adapter_name = name.replace(".", "_").replace("-", "_")
            lora = LoraModel.from_pretrained(model, path, adapter_name=adapter_name)
            row = score_adapter(lora, tokenizer, adapter_name, items, cfg, base, probes, bound, stop)
            right = row.pop("_right")
            row["lost"] = [r["probe"] for r in margins if not right[r["probe"]]]
            row["lost_min_margins"] = [round(r["min_margin"], 3) for r in margins if not right[r["probe"]]]
            payload["variants"].append({"name": name, **row})
            print(json.dumps(payload["variants"][-1]), flush=True)
            model = lora.unload()
    path = common.results_dir(False) / f"{NAME}_calibration{'_fp32' if fp32 else ''}.json"
    if wanted and path.is_file():  # some variants rerun: keep the others
        done = {v["name"] for v in payload["variants"]}
        kept = [v for v in json.loads(path.read_text())["variants"] if v["name"] not in done]
        order = [n for n, _, _ in VARIANTS]
        payload["variants"] = sorted(kept + payload["variants"], key=lambda v: order.index(v["name"]))
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps({k: payload[k] for k in ("base_right", "flips_in_the_other_precision", "near_ties")}))
    return 0


FLOOR_KL = 0.01  # a knowledge-free perturbation up to this KL marks the probes it flips as unstable


def unstable_probes(calibration: dict) -> set[int]:
    """Base-right probes that flip without any knowledge moving: in the other precision, or under a random-direction
    adapter of KL <= FLOOR_KL (an analysis of the metric's noise; lorakit's retention counts every base-right probe)."""
    lost = set(calibration.get("other_precision_lost", []))
    for v in calibration["variants"]:
        if v["name"].startswith("random-") and v["kl"] <= FLOOR_KL:
            lost |= set(v["lost"])
    return lost


def markdown(payload: dict) -> str:
    path = common.results_dir(False) / f"{NAME}_calibration.json"
    unstable = unstable_probes(json.loads(path.read_text())) if path.is_file() else None
    stable = payload["base"]["base_right"] - len(unstable) if unstable is not None else None
    rows = [["base model", "", f"{payload['base']['kb_contains']:.0%}", "100 %", "0", "", ""]]
    for r in payload.get("runs", []):
        on_stable = ""
        if stable and "lost" in r:
            kept = stable - len(set(r["lost"]) - unstable)
            on_stable = f"{kept / stable:.0%} ({kept}/{stable})"
        rows.append([r["name"], r["lever"], f"{r['kb_contains']:.0%}", f"{r['retention']:.0%} ({r['kept']}/"
                     f"{r['base_right']})", f"{r['kl']:.3f}", f"{r['train_runtime_s']:.0f}", on_stable])
    return common.table(["lever", "what changes", "held-out KB", "retention", "KL", "train s",
                         "retention on stable probes"], rows)


if __name__ == "__main__":
    raise SystemExit(main())
