"""The `lorakit` command: one subcommand per job, each `lorakit JOB [CONFIG.yaml] [key=value ...] [--key value ...]`.

Jobs: train, chat, eval, merge (alias export), serve; `lorakit JOB --help` lists each one's keys. Every job runs in the
same frame (commands/arguments.py: run_command): errors a user can fix (bad config, missing data, unknown model,
occupied output_dir) print as one `lorakit JOB: error: ...` message and exit with status 2 (config) or 1; set
LORAKIT_DEBUG=1 for the traceback. Ctrl-C exits with status 130 (during training, after saving a checkpoint).
`NPROC_PER_NODE=N lorakit train ...` (or FORCE_TORCHRUN=1) re-launches the training through torch.distributed.run
(lorakit/train/distributed.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

USAGE_TRAIN = """usage: lorakit train [CONFIG.yaml] [KEY=VALUE ...] [--KEY VALUE ...] [--FLAG ...]

Train a LoRA adapter (or the full model, or its last layers) on a data set.
CONFIG.yaml uses LLaMA-Factory's keys; KEY=VALUE, --KEY VALUE and --KEY=VALUE set or override a key, and a boolean
key given alone (--bf16, --do_train, --plot_loss) is true, as in LLaMA-Factory's own shell scripts. Values on the
command line are converted by the key's type (1e-4, true, null for empty).

examples:
  lorakit train examples/llama3_lora_sft.yaml model_name_or_path=/models/llama3 output_dir=saves/run1
  lorakit train dataset=data/my.jsonl num_train_epochs=2 lora_rank=16
  lorakit train --model_name_or_path /models/qwen --do_train --dataset data/my.jsonl --lora_target all \\
      --output_dir saves/qwen --num_train_epochs 3.0 --plot_loss --bf16

"""


def run_train(args: list[str]) -> int:
    """`lorakit train`: exit status 0 done, 1 bad input, 2 bad config, 130 interrupted (a checkpoint was saved)."""
    from .commands.arguments import run_command
    from .train import TrainConfig, train
    from .train.distributed import launch, wants_launch

    def work(config: TrainConfig) -> int:
        if wants_launch():  # NPROC_PER_NODE / FORCE_TORCHRUN: check once here, then run every rank via torchrun
            from .train.prepare import preflight

            if os.environ.get("NODE_RANK", "0") == "0":  # another node may find node 0's rank 0 already writing
                preflight(config)
            return launch(args)
        return 130 if train(config).get("status") == "interrupted" else 0

    return run_command("train", args, TrainConfig, USAGE_TRAIN, {}, {}, work)


def run_chat(args: list[str]) -> int:
    from .commands.chat import run_chat as run

    return run(args)


def run_eval(args: list[str]) -> int:
    from .commands.evaluate import run_eval as run

    return run(args)


def run_merge(args: list[str]) -> int:
    from .commands.merge import run_merge as run

    return run(args)


def run_estimate(args: list[str]) -> int:
    from .commands.estimate import run_estimate as run

    return run(args)


def run_export(args: list[str]) -> int:
    from .commands.merge import run_merge as run

    return run(args, job="export")


def run_serve(args: list[str]) -> int:
    from .commands.serve import run_serve as run

    return run(args)


# Only subcommands that work are listed; each takes its raw arguments and returns an exit status.
COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "train": (run_train, "train an adapter: lorakit train [CONFIG.yaml] [key=value ...] [--key value ...]"),
    "estimate": (run_estimate, "peak memory, time, fit and advice before training: lorakit estimate "
                               "[CONFIG.yaml] [key=value ...] [--device cpu|cuda|24GB|A100] [--json]"),
    "chat": (run_chat, "chat with a model and its adapters: lorakit chat [CONFIG.yaml] [--adapter DIR] [--prompt T]"),
    "eval": (run_eval, "score base and adapters side by side: lorakit eval --adapter DIR --dataset DATA"),
    "merge": (run_merge, "merge adapters into a standalone HF or GGUF model: lorakit merge --adapter DIR "
                         "--export_dir OUT [--format hf|gguf|gguf-lora]"),
    "export": (run_export, "same as merge (LLaMA-Factory's name)"),
    "serve": (run_serve, "serve the base and its adapters through an OpenAI-compatible API: lorakit serve "
                         "--adapter NAME=DIR [--port 8000] [--api-key KEY]"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA fine-tuning for causal language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, text) in COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if argv[0] not in COMMANDS:
        parser.error(f"unknown command {argv[0]!r} (choose from {', '.join(COMMANDS)})")
    run, _ = COMMANDS[argv[0]]
    return run(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
