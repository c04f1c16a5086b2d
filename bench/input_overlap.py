"""How separable the demo's knowledge-base inputs are from general text, per LoRA layer: why no lever moved the
trade-off (README: Keeping what the base knew). Not part of `make bench` (a diagnostic, ~3 minutes here).

A LoRA update is linear in each layer's input x: the adapted layer changes its output by s B A x. For every
layer LoRA targets (r=16 on every linear layer of the default model, B = 0: the base's own inputs), from the base
model's inputs on the self-replay pool (general text, the rows the KL term trains on):

    C = sum x x^T,  U = the top eigenvectors of C holding 99 % of trace(C)               (in, k)
    outside(X) = sum ||(I - U U^T) x||^2 / sum ||x||^2   over the tokens x of data set X

for the demo's training pairs, its held-out questions (each with its reference reply) and the general probes (each
with the base's own greedy answer), every sequence as the demo's template encodes it. An update that leaves
span(U) alone moves KB inputs by their `outside` share and probe inputs by theirs: the ratio of the two is how
much more an update can move the one than the other, linearly.

The same for replay_task_directions' subspace (lorakit.train.null_space.task_directions, from the training pairs'
and the replay rows' sums): Q = the top TASK_K generalized eigenvectors, inside(X) = sum ||Q Q^T x||^2 / sum ||x||^2.

    python bench/input_overlap.py --pool saves/.lorakit-replay/self-replay-<key>.json   # the demo's pool
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

import common

NAME = "input_overlap"
ENERGY = 0.99
TASK_K = 16
BATCH = 16


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pool", required=True, help="a self-replay pool file (.lorakit-replay/self-replay-*.json)")
    return p.parse_args(argv)


def sequences(tokenizer, template, conversations: list[list[dict]]) -> list[list[int]]:
    from lorakit.data import encode_records

    examples, _ = encode_records([{"messages": c} for c in conversations], tokenizer, template)
    return [e["input_ids"] for e in examples]


def input_sums(model, layers, seqs: list[list[int]], pad_id: int) -> dict:
    """Per layer key: sum of x x^T (in, in) float64 over every token of `seqs` (lorakit.train.null_space's own
    measurement; layers that read one input get the same sum)."""
    import contextlib

    import torch

    from lorakit.train.null_space import covariances

    rows = [{"input_ids": s, "labels": s} for s in seqs]
    sums, owner = covariances(model, layers, rows, contextlib.nullcontext, contextlib.nullcontext,
                              torch.device("cpu"), pad_id)
    return {key: sums[owner[key]] for key, _ in layers}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.setup_path()
    import torch

    from lorakit import LoraConfig, demo, get_lora_model, retention
    from lorakit.chat import stop_token_ids
    from lorakit.data import get_template
    from lorakit.lora.inject import lora_layers
    from lorakit.models import load_model
    from lorakit.train.null_space import kept_directions, task_directions

    cfg, _ = demo.load_config(demo.CONFIG, [])
    model, tokenizer, _ = load_model(None, dtype="float32")
    template = get_template(cfg.template, tokenizer)
    data = demo.ROOT / cfg.dataset_dir
    pool = [r["messages"] for r in json.loads(Path(args.pool).read_text())["records"]]
    train = [[{"role": "user", "content": "\n".join(x for x in (r["instruction"], r["input"]) if x)},
              {"role": "assistant", "content": r["output"]}] for r in json.loads((data / "kb_train.json").read_text())]
    held = [[{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]
            for r in json.loads((data / "kb_heldout.json").read_text())]
    probes = retention.load_probes()
    stop = stop_token_ids(tokenizer, model, template.stop_words)
    with torch.no_grad():
        answers = retention.ask(model, tokenizer, probes, "__base__", template.prompt_ids, stop)
    general = [[{"role": "user", "content": p.prompt}, {"role": "assistant", "content": a}]
               for p, a in zip(probes, answers.texts)]
    lora = get_lora_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=common.TARGETS))
    layers = lora_layers(lora.get_base_model())
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sets = {"replay": pool, "kb_train": train, "kb_heldout": held, "probes": general}
    sums = {name: input_sums(model, layers, sequences(tokenizer, template, convs), pad) for name, convs in sets.items()}
    rows = []
    for key, m in layers:
        v = kept_directions(sums["replay"][key], ENERGY).double()  # (in, in - k)
        outside = v @ v.T  # I - U U^T
        share = {name: float(torch.trace(outside @ sums[name][key] @ outside) / torch.trace(sums[name][key]))
                 for name in ("kb_train", "kb_heldout", "probes")}
        q = task_directions(sums["kb_train"][key], sums["replay"][key], TASK_K).double()  # (in, k)
        inside = q @ q.T
        within = {name: float(torch.trace(inside @ sums[name][key] @ inside) / torch.trace(sums[name][key]))
                  for name in ("kb_heldout", "probes")}
        found = re.search(r"layers\.(\d+)\..*\.(\w+)$", key)
        rows.append({"layer": int(found.group(1)), "module": found.group(2),
                     "removed_directions": m.in_features - v.shape[1], "in": m.in_features,
                     **{f"outside_{name}": value for name, value in share.items()},
                     "ratio_heldout_probes": share["kb_heldout"] / share["probes"],
                     **{f"task_inside_{name}": value for name, value in within.items()},
                     "task_ratio_heldout_probes": within["kb_heldout"] / within["probes"]})
    by_module = {}
    for module in common.TARGETS:
        ratios = [r["ratio_heldout_probes"] for r in rows if r["module"] == module]
        by_module[module] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
                             "median_outside_kb_heldout": statistics.median(
                                 r["outside_kb_heldout"] for r in rows if r["module"] == module),
                             "median_outside_probes": statistics.median(
                                 r["outside_probes"] for r in rows if r["module"] == module)}
    for module in common.TARGETS:
        ratios = [r["task_ratio_heldout_probes"] for r in rows if r["module"] == module]
        by_module[module].update({"task_median": statistics.median(ratios), "task_min": min(ratios),
                                  "task_max": max(ratios), "task_median_inside_kb_heldout": statistics.median(
                                      r["task_inside_kb_heldout"] for r in rows if r["module"] == module)})
    lines = [[m, f"{v['median_outside_kb_heldout']:.3f}", f"{v['median_outside_probes']:.3f}",
              f"{v['median']:.2f}", f"{v['min']:.2f}-{v['max']:.2f}"] for m, v in by_module.items()]
    md = (f"### Input energy outside the {ENERGY:.0%} subspace of the replay rows' inputs, per LoRA layer "
          f"(median over the {len(rows) // len(common.TARGETS)} layers)\n\n"
          + common.table(["module", "KB held-out", "probes", "ratio (median)", "ratio (range over layers)"], lines)
          + f"\n\nInside replay_task_directions' {TASK_K} directions:\n\n"
          + common.table(["module", "KB held-out", "ratio (median)", "ratio (range over layers)"],
                         [[m, f"{v['task_median_inside_kb_heldout']:.3f}", f"{v['task_median']:.2f}",
                           f"{v['task_min']:.2f}-{v['task_max']:.2f}"] for m, v in by_module.items()])
          + f"\n\nPool: {Path(args.pool).name} ({len(pool)} rows). "
          f"Machine: {common.describe_machine(common.machine())}.")
    print(md)
    out = common.results_dir(False) / f"{NAME}.json"
    out.write_text(json.dumps({"machine": common.machine(), "pool": Path(args.pool).name, "energy": ENERGY,
                               "task_k": TASK_K,
                               "by_module": by_module, "layers": rows, "markdown": md}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
