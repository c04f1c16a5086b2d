"""What each training lever is worth: one process, one model, the same 16 demo examples, variants interleaved.

Every variant runs forward + backward over the same examples (one optimizer step's worth of micro-batches, no
optimizer), A/B/A/B... so that load from other processes hits all variants alike; the table gives the median
seconds and the speed-up over the variant it changes. LoRA r=16 all-linear on the default model.

    python bench/bench_levers.py [--smoke] [--rounds R]
    python bench/bench_levers.py --attention     # SDPA forward + backward in bf16 and fp32 by row length

--attention times one layer's attention (4 rows, the default model's 9 query and 3 key/value heads of 64, causal) in
bf16 and in fp32 at several row lengths: where the CPU attention of `lorakit.train.attention` switches to fp32
(FP32_UP_TO) comes from this table (results: bench/results/levers_attention.json).
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
     {"packing": True, "chunked": True, "amp": True, "bf16_base": True, "cpu_attention": True}),
    ("bf16, padded x4, chunked, bf16 base", "the padded micro-batches of 4 (the demo's) in bf16 autocast",
     "fp32, padded x4, head on labels, chunked", {"packing": False, "chunked": True, "amp": True, "bf16_base": True}),
    ("bf16, padded x4, chunked, bf16 base, fp32 attention", "their attention in fp32 (rows of at most 256 tokens)",
     "bf16, padded x4, chunked, bf16 base",
     {"packing": False, "chunked": True, "amp": True, "bf16_base": True, "cpu_attention": True}),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny model from a config, one round, no download")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--examples", type=int, default=16, help="demo examples per pass")
    p.add_argument("--attention", action="store_true", help="SDPA in bf16 against fp32 by row length instead")
    return p.parse_args(argv)


ROW_LENGTHS = (40, 64, 128, 256, 512)


def attention_ms(length: int, dtype, repeats: int = 12) -> float:
    """Median ms of SDPA forward + backward on (4, 9, length, 64) queries against 3 grouped key/value heads."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    q = torch.randn(4, 9, length, 64, generator=g).to(dtype).requires_grad_()
    k, v = (torch.randn(4, 3, length, 64, generator=g).to(dtype).requires_grad_() for _ in range(2))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()
        times.append((time.perf_counter() - start) * 1e3)
    return common.median(times)


def attention_table(smoke: bool) -> int:
    import torch

    machine = common.machine()
    lengths = ROW_LENGTHS[:2] if smoke else ROW_LENGTHS
    rows = []
    for n in lengths:
        bf16, fp32 = attention_ms(n, torch.bfloat16), attention_ms(n, torch.float32)
        rows.append({"tokens": n, "bf16_ms": bf16, "fp32_ms": fp32})
    md = (f"### One layer's attention, forward + backward (4 rows, 9 query / 3 key-value heads of 64, causal), "
          f"{common.torch_threads()} thread(s), median of 12\n\n"
          + common.table(["row length", "bf16 ms", "fp32 ms", "fp32 vs bf16"],
                         [[r["tokens"], r["bf16_ms"], r["fp32_ms"], f"{r['bf16_ms'] / r['fp32_ms']:.2f}x"]
                          for r in rows])
          + f"\n\nMachine: {common.describe_machine(machine)}.")
    print(md)
    common.write_results(f"{NAME}_attention", {"machine": machine, "rows": rows}, md, smoke)
    return 0


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
    from lorakit.train.attention import NAME, use_cpu_attention
    from lorakit.train.loss import causal_lm_loss

    use_cpu_attention(model)  # registers it; each variant then picks its attention by name
    model.config._attn_implementation = NAME if settings.get("cpu_attention") else "sdpa"
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
    if args.attention:
        return attention_table(args.smoke)
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
