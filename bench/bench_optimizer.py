"""What the fused AdamW kernel is worth on a CPU: one optimizer step over the LoRA parameters of the demo's setup.

LoRA r=16 on every linear layer of the default model (the parameters only: the step does not depend on the
weights), gradients drawn once; the for-each-parameter loop (torch's CPU default, what lorakit used before) and the
fused kernel (what `lorakit train` uses now on a CPU, `train.methods.make_optimizer`) step the same parameters from
the same state, alternating, and the table gives the median milliseconds per step and how far apart the parameters
end up.

    python bench/bench_optimizer.py [--smoke] [--rounds R] [--steps S]
"""

from __future__ import annotations

import argparse
import sys
import time

import common

NAME = "optimizer"
VARIANTS = [("loop", {"foreach": False}), ("fused", {"fused": True})]  # (name, torch.optim.AdamW keywords)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny model from a config, one round, no download")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per round")
    return p.parse_args(argv)


def lora_parameters(smoke: bool) -> list:
    """Copies of the LoRA parameters (A and B of every layer) of the model, each with a seeded gradient."""
    import torch
    import train_rows

    from lorakit import LoraConfig, get_lora_model

    if smoke:
        model = train_rows.tiny_model_and_tokenizer()[0]
    else:
        from lorakit.models import load_model

        model = load_model(None, dtype="float32")[0]
    lora = get_lora_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=common.TARGETS))
    generator = torch.Generator().manual_seed(0)
    params = []
    for p in lora.parameters():
        if p.requires_grad:
            q = torch.nn.Parameter(torch.randn(p.shape, generator=generator) * 0.02)
            q.grad = torch.randn(p.shape, generator=generator) * 1e-3
            params.append(q)
    return params


def run(params: list, keywords: dict, steps: int) -> tuple[float, list]:
    """Seconds per step of AdamW with `keywords` over copies of `params` (after 2 warm-up steps), and the copies."""
    import torch

    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for c, p in zip(copies, params):
        c.grad = p.grad.clone()
    opt = torch.optim.AdamW(copies, lr=1e-3, weight_decay=0.0, **keywords)
    for _ in range(2):
        opt.step()
    start = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return (time.perf_counter() - start) / steps, copies


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.setup_path()
    machine = common.machine()
    params = lora_parameters(args.smoke)
    n = sum(p.numel() for p in params)
    times: dict[str, list[float]] = {name: [] for name, _ in VARIANTS}
    ends = {}
    for r in range(1 if args.smoke else args.rounds):
        for name, keywords in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
            seconds, ends[name] = run(params, keywords, 3 if args.smoke else args.steps)
            times[name].append(seconds)
    apart = max(float((a - b).detach().abs().max()) for a, b in zip(ends["loop"], ends["fused"]))
    medians = {name: common.median(t) for name, t in times.items()}
    lines = [[name, len(params), n, round(medians[name] * 1e3, 2),
              f"{medians['loop'] / medians[name]:.2f}x"] for name, _ in VARIANTS]
    md = (f"### AdamW step over the LoRA parameters (r=16, all linear layers), {common.torch_threads()} thread(s), "
          f"median of {len(times['loop'])} rounds\n\n"
          + common.table(["variant", "tensors", "parameters", "ms per step", "vs loop"], lines)
          + f"\n\nLargest difference between the two variants' parameters after the same steps: {apart:.1e}."
          + f"\n\nMachine: {common.describe_machine(machine)}.")
    print(md)
    common.write_results(NAME, {"machine": machine, "times": times, "medians": medians, "max_abs_diff": apart,
                                "parameters": n, "tensors": len(params)}, md, args.smoke)
    return 0


if __name__ == "__main__":
    sys.exit(main())
