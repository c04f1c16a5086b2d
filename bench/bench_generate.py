"""Generation speed: base model, base + unmerged adapter, merged adapter, and a mixed batch of 8 adapters.

Greedy decoding of a batch of 8 chat prompts, a fixed number of new tokens (no early stop), fp32. lorakit rows use
`lorakit.generation.generate` with a `LoraModel` (mixed batch: `adapter_names=[a0..a7]`, one adapter per row);
the reference rows use PEFT's `PeftModel` and transformers' `generate` (mixed batch: PEFT's `adapter_names`).
Each row runs in its own process; tokens/s is the median of 5 timed runs after a warm-up.

    python bench/bench_generate.py [--smoke] [--new-tokens N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import common

NAME = "generate"
MODES = ("base", "unmerged", "merged", "mixed8")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny model from a config, a few tokens, no download")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--row", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build(spec: dict):
    """(callable that generates once, tokens per call) for the row's implementation and mode."""
    import fixtures
    import torch

    from lorakit.models import load_model

    smoke = spec["smoke"]
    model, tokenizer, _ = load_model(str(fixtures.model_dir(smoke)) if smoke else None, dtype="float32",
                                     device="cpu")
    adapters = fixtures.adapter_dirs(smoke)
    prompts = fixtures.prompts(tokenizer, smoke)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    mode, new = spec["mode"], spec["new_tokens"]
    names = [f"a{i}" for i in range(len(adapters))] if mode == "mixed8" else None
    if spec["impl"] == "lorakit":
        from lorakit import LoraModel
        from lorakit.generation import Sampling, generate

        target = model
        if mode != "base":
            target = LoraModel.from_pretrained(model, adapters[0], adapter_name="a0")
            for i, d in enumerate(adapters[1:] if mode == "mixed8" else [], start=1):
                target.load_adapter(d, f"a{i}")
            if mode == "merged":
                target.merge_adapter()

        def once(n: int = new):
            return generate(target, prompts, Sampling(max_new_tokens=n), stop_ids=set(), pad_id=pad_id,
                            adapter_names=names)
        return once, len(prompts) * new
    from peft import PeftModel

    target = model
    if mode != "base":
        target = PeftModel.from_pretrained(model, str(adapters[0]), adapter_name="a0")
        for i, d in enumerate(adapters[1:] if mode == "mixed8" else [], start=1):
            target.load_adapter(str(d), adapter_name=f"a{i}")
        if mode == "merged":
            target.merge_adapter()
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])  # (B, T), left padding
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    extra = {"adapter_names": names} if names else {}

    @torch.inference_mode()
    def once(n: int = new):
        return target.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=pad_id, **extra)
    return once, len(prompts) * new


def run(spec: dict) -> dict:
    once, tokens = build(spec)
    once(2)  # warm-up
    times = []
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    return {**spec, "tokens_per_s": tokens / common.median(times), "seconds": times,
            "peak_rss_mb": common.peak_rss_mb()}


def summarise(results: list[dict]) -> tuple[str, dict]:
    got = {(r["impl"], r["mode"]): r for r in results}
    ratios = {}
    headers = ["mode", "lorakit tokens/s", "PEFT + transformers tokens/s", "lorakit vs PEFT", "lorakit vs its base"]
    lines = []
    for mode in MODES:
        mine, ref = got.get(("lorakit", mode), {}), got.get(("peft", mode), {})
        tps, ref_tps = mine.get("tokens_per_s"), ref.get("tokens_per_s")
        base = got.get(("lorakit", "base"), {}).get("tokens_per_s")
        vs_ref = tps / ref_tps if tps and ref_tps else None
        vs_base = tps / base if tps and base else None
        ratios[mode] = {"vs_peft": vs_ref, "vs_base": vs_base}
        label = {"base": "base model", "unmerged": "base + 1 adapter, unmerged", "merged": "1 adapter, merged",
                 "mixed8": "mixed batch, 8 adapters (adapter_names)"}[mode]
        lines.append([label, tps or mine.get("error", "")[:60], ref_tps or ref.get("error", "")[:60],
                      f"{vs_ref:.2f}x" if vs_ref else None, f"{vs_base:.2f}x" if vs_base else None])
    return common.table(headers, lines), ratios


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.setup_path()
    if args.row:
        common.emit_row(run(json.loads(args.row)))
        return 0
    import fixtures

    machine = common.machine()
    fixtures.adapter_dirs(args.smoke)  # create (and cache) the adapters before anything is timed
    base = {"smoke": args.smoke, "new_tokens": 4 if args.smoke else args.new_tokens,
            "repeats": 1 if args.smoke else args.repeats}
    results = []
    for mode in MODES:
        for impl in ("lorakit", "peft"):
            spec = {**base, "impl": impl, "mode": mode}
            results.append(run(spec) if args.smoke else common.run_row(common.BENCH_DIR / "bench_generate.py", spec))
            r = results[-1]
            print(f"  {impl} {mode}: " + (r.get("error") or f"{r['tokens_per_s']:.1f} tok/s"), file=sys.stderr,
                  flush=True)
    md, ratios = summarise(results)
    md = (f"### Generation: batch of 8 prompts, {base['new_tokens']} new tokens each, greedy, fp32\n\n{md}\n\n"
          f"Machine: {common.describe_machine(machine)}.")
    print(md)
    common.write_results(NAME, {"machine": machine, "ratios": ratios, "runs": results}, md, args.smoke)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
