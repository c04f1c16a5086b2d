"""`lorakit estimate [CONFIG.yaml] [key=value ...] [--device cpu|cuda|24GB|GPU] [--json]`: the same settings as
`lorakit train`, planned before any weight is loaded (see lorakit.estimate)."""

from __future__ import annotations

import json
import os

from ..settings import ConfigError, read_yaml, split_argv, wants_help
from ..train.config import TrainConfig
from ..train.options import config_help
from .arguments import fail, say

USAGE = """usage: lorakit estimate [CONFIG.yaml] [KEY=VALUE ...] [--device cpu|cuda|24GB|GPU NAME] [--json]

Predict, before training and without loading weights, a `lorakit train` run's peak memory by part, its time,
whether it fits the device (and if not, what to change), and rank/method advice from the data set's size.
The keys are lorakit train's; without a dataset every batch is assumed full.

  --device   cpu (this machine: its memory and measured matmul peak), cuda (the GPU present), a memory size
             (24GB) or a GPU name (H200, H100, A100, A100 40GB, L40S, A10, L4, RTX 4090, RTX 3090, V100, T4);
             default: the config's device, else CUDA when present, else cpu
  --json     one JSON object (peak_bytes, parts, fits, tokens_per_s, ...) instead of the table

example:
  lorakit estimate demo/train.yaml
  lorakit estimate model_name_or_path=examples/configs/llama-3-8b finetuning_type=qlora --device 24GB

"""


def split_flags(argv: list[str]) -> tuple[list[str], str | None, bool, list[str]]:
    """(the other arguments, --device value, --json, problems)."""
    rest, device, as_json, problems = [], None, False, []
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if token == "--json":
            as_json = True
        elif token == "--device":
            if i >= len(argv):
                problems.append("flag --device needs a value")
            else:
                device, i = argv[i], i + 1
        elif token.startswith("--device="):
            device = token.partition("=")[2]
        else:
            rest.append(token)
    return rest, device, as_json, problems


def parse(argv: list[str]) -> tuple[TrainConfig, str | None, bool, list[str]]:
    """(config, device text, json, ignored keys); raises ConfigError with every problem."""
    from ..estimate.plan import config_for_keys

    rest, device, as_json, problems = split_flags(argv)
    path, items, more = split_argv(TrainConfig, rest, {})
    problems += more
    if problems:
        raise ConfigError(problems)
    raw = {**(read_yaml(path) if path else {}), **items}
    cfg, ignored = config_for_keys(raw)
    return cfg, device or cfg.device, as_json, ignored


def run_estimate(argv: list[str]) -> int:
    """Exit status 0 (also when the run would not fit), 1 bad model or data, 2 bad settings."""
    if wants_help(argv):
        print(USAGE + config_help())
        return 0
    try:
        cfg, device, as_json, ignored = parse(argv)
    except ConfigError as exc:
        return fail("estimate", exc, 2)
    if ignored:
        say("estimate", f"ignoring keys that change nothing here: {', '.join(ignored)}")
    from ..estimate import as_json as to_json
    from ..estimate import estimate, table

    try:
        result = estimate(cfg, device)
    except KeyboardInterrupt:
        print("lorakit estimate: aborted", flush=True)
        return 130
    except (ValueError, OSError) as exc:  # ModelError, DataError, an unknown --device
        if os.environ.get("LORAKIT_DEBUG"):
            raise
        return fail("estimate", exc, 1)
    print(json.dumps(to_json(result), indent=2) if as_json else table(result))
    return 0
