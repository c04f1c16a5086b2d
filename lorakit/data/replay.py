"""Replay rows: general conversations mixed into every epoch of training, so an adapter keeps what its base knew.

With `replay_ratio` r, replay rows are a share r of each epoch's training examples:

    n_replay = round(n_task * r / (1 - r))        # n_task = task examples after the validation split

drawn once, seeded (`sample_rows`): a shuffle of the replay pool, repeated whole when the pool is smaller than
n_replay, so every pool row appears floor(n/len) or ceil(n/len) times. The same rows come back every epoch, shuffled
in with the task rows by the usual batch order. The validation split is cut from the task data only.

The pool is either the records of `replay_dataset` or, with `self_replay`, the base model's own greedy answers to
general prompts (`lorakit.train.self_replay` makes them): the shipped `data/self_replay_prompts.json`, or the
prompts (each conversation minus its last assistant reply) of `replay_dataset`. The shipped prompts share no prompt
with the retention probes (`data/retention_probes.json`), so retention is never measured on training data.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .formats import DataError

SELF_REPLAY_PROMPTS = Path(__file__).resolve().parent / "self_replay_prompts.json"


@dataclass
class Replay:
    """The replay pool (normalised records) and a line that says where it came from, for the start-up report."""

    records: list[dict] = field(default_factory=list)
    source: str = ""


def replay_count(n_task: int, ratio: float) -> int:
    """Replay rows that make a share `ratio` of an epoch with `n_task` task examples."""
    if not 0 <= ratio < 1:
        raise DataError(f"replay_ratio must be in [0, 1), got {ratio}")
    return round(n_task * ratio / (1 - ratio))


def sample_rows(rows: list, n: int, seed: int) -> list:
    """`n` rows of `rows`: one seeded shuffle, repeated whole as often as needed, cut at n."""
    if n and not rows:
        raise DataError("the replay pool is empty")
    order = np.random.default_rng([seed, 7]).permutation(len(rows)).tolist() if rows else []
    picked = order * (n // len(rows)) + order[:n % len(rows)] if rows else []
    return [rows[i] for i in picked]


def mix_replay(train: list[dict], pool: list[dict], ratio: float, seed: int,
               encode: Callable[[dict], dict | None]) -> tuple[list[dict], str]:
    """(task examples followed by the replay examples that make `ratio` of the epoch, a report line).

    `pool` holds replay records; only the ones drawn are encoded (`encode(record)`: an example, or None when
    nothing of it is left to learn), so a large replay data set costs only what is used.
    """
    n = replay_count(len(train), ratio)
    drawn = sample_rows(list(range(len(pool))), n, seed)
    encoded = {i: encode(pool[i]) for i in sorted(set(drawn))}
    rows = [encoded[i] for i in drawn if encoded[i] is not None]
    repeats = f"; each of the pool's {len(pool)} records about {n / len(pool):.1f} times" if n > len(pool) else ""
    line = f"replay: {len(rows)} rows, {len(rows) / max(len(train) + len(rows), 1):.0%} of each epoch's " \
           f"{len(train) + len(rows)} examples{repeats}"
    return train + rows, line


def prompts_of(records: list[dict], where: str) -> list[list[dict]]:
    """The prompt of each conversation: its messages up to (not including) the last assistant reply."""
    prompts = []
    for record in records:
        messages = record.get("messages")
        if not messages:
            raise DataError(f"{where}: self_replay needs conversations; {record.get('source', 'a record')} has none")
        cut = len(messages) - 1 if messages[-1]["role"] == "assistant" else len(messages)
        prompt = [dict(m) for m in messages[:cut]]
        if prompt and prompt[-1]["role"] == "user":
            prompts.append(prompt)
    if not prompts:
        raise DataError(f"{where}: no conversation ends with a user turn to answer")
    return prompts


def shipped_prompts(path: Path = SELF_REPLAY_PROMPTS) -> list[list[dict]]:
    """The shipped self-replay prompts (a JSON list of {"instruction": text}) as one-turn conversations."""
    items = json.loads(path.read_text(encoding="utf-8"))
    return [[{"role": "user", "content": item["instruction"]}] for item in items]
