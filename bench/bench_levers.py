"""What each training lever is worth: one process, one model, the same 16 demo examples, variants interleaved.

Every variant runs forward + backward over the same examples (one optimizer step's worth of micro-batches, no
optimizer), A/B/A/B... so that load from other processes hits all variants alike; the table gives the median
seconds and the speed-up over the variant it changes. LoRA r=16 all-linear on the default model.

    python bench/bench_levers.py [--smoke] [--rounds R]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import time

import common

NAME = "levers"

# (name, what it changes, the variant it is compared with, settings)
VARIANTS = [
    ("fp32, padded x4, full logits", "PEFT-like step: micro-batches of 4 padded, the model's own loss", None,
     {"packing": False, "chunked": False}),
    ("fp32, padded x4, head on labels, chunked", "chunked cross-entropy on label tokens only",
     "fp32, padded x4, full logits", {"packing": False, "chunked": True}),
    ("fp32, packed rows, chunked", "packing without padding (one row of <= 512 tokens per micro-batch)",
     "fp32, padded x4, head on labels, chunked", {"packing": True, "chunked": True}),
    ("bf16 autocast, packed, chunked, fp32 base", "bf16 autocast (AVX-512-BF16)", "fp32, packed rows, chunked",
     {"packing": True, "chunked": True, "amp": True}),
    ("bf16 autocast, packed, chunked, bf16 base", "frozen base weights stored in bf16",
     "bf16 autocast, packed, chunked, fp32 base", {"packing": True, "chunked": True, "amp": True, "bf16_base": True}),
    ("bf16, packed, chunked, bf16 base, attention per example", "attention per example inside a packed row",
     "bf16 autocast, packed, chunked, bf16 base",
     {"packing": True, "chunked": True, "amp": True, "bf16_base": True, "packed_attention": True}),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny model from a config, one round, no download")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--examples", type=int, default=16, help="demo examples per pass")
    return p.parse_args(argv)


def setup(smoke: bool, n: int = 16):
    import torch
    import train_rows

    from lorakit import LoraConfig, get_lora_model

    if smoke:
        model, tokenizer = train_rows.tiny_model_and_tokenizer()
        examples = train_rows.synthetic_examples(8, model.config.vocab_size)
    else:
        from lorakit.models import load_model

        model, tokenizer, _ = load_model(None, dtype="float32")
        examples = train_rows.split(train_rows.dataset_examples("demo", tokenizer, 512), n, 0)[0]
    lora = get_lora_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=common.TARGETS))
    model = lora.get_base_model()
    train_rows.seed_lora_weights(model)
    model.train()
    bf16_model = copy.deepcopy(model)  # the bf16-base variant changes the model: it gets a copy of its own
    from lorakit.train.precision import store_frozen_base

    store_frozen_base(bf16_model, torch.bfloat16)
    return model, bf16_model, tokenizer.pad_token_id, examples


def one_pass(model, pad_id: int, examples: list[dict], settings: dict) -> float:
    import torch

    from lorakit.data import collate_packed, pack_examples, pad_collate
    from lorakit.train.attention import NAME, use_packed_attention
    from lorakit.train.loss import causal_lm_loss

    use_packed_attention(model)  # registers it; each variant then picks its attention by name
    model.config._attn_implementation = NAME if settings.get("packed_attention") else "sdpa"
    if settings["packing"]:
        batches = [collate_packed([row], pad_id) for row in pack_examples(examples, 512)]
    else:
        batches = [pad_collate(examples[i:i + 4], pad_id) for i in range(0, len(examples), 4)]
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if settings.get("amp") else contextlib.nullcontext
    start = time.perf_counter()
    for batch in batches:
        with ctx():
            total, count = causal_lm_loss(model, batch, chunked=settings["chunked"])
        (total / 100).backward()
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return seconds


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.setup_path()
    machine = common.machine()
    model, bf16_model, pad_id, examples = setup(args.smoke, args.examples)
    tokens = sum(len(e["input_ids"]) for e in examples)
    times: dict[str, list[float]] = {name: [] for name, *_ in VARIANTS}
    if not args.smoke:  # warm-up on two examples: first-call costs (allocator, kernels) are not a lever
        for variant in VARIANTS:
            one_pass(bf16_model if variant[3].get("bf16_base") else model, pad_id, examples[:2], variant[3])
    for r in range(1 if args.smoke else args.rounds):
        order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
        for name, _, _, settings in order:
            times[name].append(one_pass(bf16_model if settings.get("bf16_base") else model, pad_id, examples,
                                        settings))
            print(f"  {name}: {times[name][-1]:.2f} s", file=sys.stderr, flush=True)
    medians = {name: common.median(t) for name, t in times.items()}
    lines = []
    for name, what, base, _ in VARIANTS:
        gain = medians[base] / medians[name] if base else None
        lines.append([name, what, medians[name], tokens / medians[name], f"{gain:.2f}x" if gain else None])
    md = (f"### Training levers: forward + backward over the same {len(examples)} demo examples ({tokens} tokens), "
          f"{common.torch_threads()} thread(s), median of {len(next(iter(times.values())))}\n\n"
          + common.table(["variant", "lever", "seconds", "tokens/s", "vs previous row"], lines)
          + f"\n\nMachine: {common.describe_machine(machine)}.")
    print(md)
    common.write_results(NAME, {"machine": machine, "times": times, "medians": medians}, md, args.smoke)
    return 0


if __name__ == "__main__":
    sys.exit(main())
