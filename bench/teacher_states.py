"""What keeping the base's hidden states on the replay rows is worth (lorakit/train/teacher.py), in `make demo`'s run.

The demo recipe (demo/train.yaml: self-replay 30 %, replay_kl_weight 1) for `--steps` optimizer steps, twice per
round: with the states computed once before training (what `lorakit train` does) and with the base's forward run on
the replay rows of every step (what it does when they would not fit: the limit set to 0), alternating so that load
from other processes hits both alike. The table gives the median training seconds, the ratio, and each variant's
mean training loss (the same up to rounding). Not part of `make bench` (minutes, the real model only):

    python bench/teacher_states.py [--rounds 3] [--steps 120]
"""

from __future__ import annotations

import argparse
import statistics
import sys

import common

NAME = "teacher_states"
VARIANTS = (("states kept", None), ("forward every step", 0))  # (name, the byte limit: None = lorakit's)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=120)
    args = p.parse_args(argv)
    common.setup_path()
    import lorakit.train.trainer as trainer_module
    from lorakit import demo
    from lorakit.train import load_config, train

    kept_limit = trainer_module.TEACHER_MAX_BYTES
    runs: dict[str, list[dict]] = {name: [] for name, _ in VARIANTS}
    for round_no in range(args.rounds):
        for name, limit in VARIANTS:
            trainer_module.TEACHER_MAX_BYTES = kept_limit if limit is None else limit
            out = common.cache_dir() / f"teacher-states-{name.replace(' ', '-')}"
            cfg, _ = load_config(demo.CONFIG, [f"max_steps={args.steps}", f"output_dir={out}", "plot_loss=false"])
            cfg.dataset_dir = str(demo.ROOT / cfg.dataset_dir)
            result = train(cfg)
            runs[name].append({"seconds": result["train_runtime"], "train_loss": result["train_loss"]})
            print(f"round {round_no + 1} {name}: {result['train_runtime']:.1f} s", file=sys.stderr, flush=True)
    trainer_module.TEACHER_MAX_BYTES = kept_limit
    median = {name: statistics.median(r["seconds"] for r in rows) for name, rows in runs.items()}
    kept, every = (name for name, _ in VARIANTS)
    lines = [f"### KL term: the base's states on the replay rows kept, or its forward every step ({args.steps} steps "
             f"of the demo recipe, {args.rounds} rounds)", "",
             "| variant | median training s | vs forward every step | train loss |", "|---|---|---|---|"]
    for name, rows in runs.items():
        lines.append(f"| {name} | {median[name]:.1f} | {median[every] / median[name]:.2f}x | "
                     f"{rows[0]['train_loss']:.5f} |")
    markdown = "\n".join(lines)
    common.write_results(NAME, {"machine": common.machine(), "steps": args.steps, "rounds": args.rounds,
                                "runs": runs, "median_seconds": median,
                                "speedup": median[every] / median[kept]}, markdown, smoke=False)
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
