"""The data set's size as the trainer will see it: examples, tokens, label tokens, the epoch's batches, and the
largest forward pass among them (the one that sets the activation peak).

The data are read, templated, tokenised, truncated, split and packed by the trainer's own `prepare_data`; the
batches are the trainer's epoch-0 order (`batch_order`, a pure function of the seed); on a CPU a batch above
`CPU_SPLIT_ABOVE` tokens is cut into pieces of rows as `cpu_levers.row_pieces` does, and in bf16 on a CPU token
counts are rounded up by the trainer's `shape_bucket`. Without a data set every micro-batch is assumed full:
batch x cutoff_len tokens, all of them labels.

Replay rows (replay_ratio > 0) join the epoch as the trainer mixes them (`prepare_data` with the replay pool):
replay_dataset's records, or self-replay's cached pool when a run with these settings has generated it; before that,
each self-replay answer is assumed self_replay_max_new_tokens long (the most it can be).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import IGNORE_INDEX, batch_order, load_records, pack_examples
from ..data.replay import Replay, replay_count, sample_rows
from ..train.config import TrainConfig
from ..train.cpu_levers import CPU_PIECE_TOKENS, CPU_SPLIT_ABOVE
from ..train.prepare import prepare_data, task_data
from ..train.self_replay import drawn_prompts, pool_file, replay_source
from .memory import Workload


@dataclass
class DataSize:
    """One epoch of training items (examples, or packed rows) as lengths and label counts."""

    lengths: list[int]
    labels: list[int]
    examples: int
    """Training examples (after the validation split; several per packed row)."""
    packed: bool
    measured: bool
    """False when there is no data set and full rows are assumed."""
    tokenizer: str = ""
    """Which tokenizer counted the tokens."""
    replay_rows: int = 0
    """Of `lengths`, the replay rows mixed into the epoch (their examples are not in `examples`)."""
    replay_tokens: int = 0
    replay_labels: int = 0
    kl_labels: int = 0
    """Replay label tokens the KL term reads (replay_kl_weight): the base's head runs on them too."""
    replay_source: str = ""
    """Where the replay rows' lengths come from (a phrase for the report)."""

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    @property
    def label_tokens(self) -> int:
        return sum(self.labels)

    @property
    def task_tokens(self) -> int:
        return self.tokens - self.replay_tokens

    @property
    def task_label_tokens(self) -> int:
        return self.label_tokens - self.replay_labels

    def clipped(self, cutoff_len: int) -> DataSize:
        """The same items cut at a shorter cutoff_len (labels kept in proportion): for what-if advice."""
        lengths = [min(n, cutoff_len) for n in self.lengths]
        labels = [round(lab * m / n) if n else 0 for lab, m, n in zip(self.labels, lengths, self.lengths)]
        share = sum(labels) / max(self.label_tokens, 1)
        return DataSize(lengths, labels, self.examples, self.packed, self.measured, self.tokenizer, self.replay_rows,
                        round(self.replay_tokens * sum(lengths) / max(self.tokens, 1)),
                        round(self.replay_labels * share), round(self.kl_labels * share), self.replay_source)


@dataclass
class Epoch:
    """What one epoch computes: micro-batches, tokens with padding, and the largest single pass."""

    micro_batches: int
    computed_tokens: int
    worst: Workload
    typical_pass: int = 0
    """The median tokens (rows x width) of one forward pass: what the matmuls' row count is, mostly."""


def assumed(cfg: TrainConfig) -> DataSize:
    """No data set: one optimizer step of full rows (cutoff_len tokens, all labels)."""
    n = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    return DataSize([cfg.cutoff_len] * n, [cfg.cutoff_len - 1] * n, n, bool(cfg.packing), measured=False)


def epoch(data: DataSize, cfg: TrainConfig, bucket, cpu: bool) -> Epoch:
    """The trainer's epoch-0 batches of `data` for `cfg` (module docstring)."""
    group = cfg.group_by_length and not data.packed
    batches = batch_order(data.lengths, cfg.per_device_train_batch_size, cfg.seed, 0, group_by_length=group)
    worst, computed, passes = None, 0, []
    for batch in batches:
        lengths = [data.lengths[i] for i in batch]
        rows, width = pieces(lengths, bucket, cpu)
        passes.append(rows * width)
        full = bucket(max(lengths)) if bucket else max(lengths)
        computed += sum(lengths) if data.packed else full * len(lengths)
        if worst is None or rows * width > worst.tokens:
            top = sorted((data.labels[i] for i in batch), reverse=True)[:rows]
            worst = Workload(rows, width, sum(top), data.packed)
    return Epoch(len(batches), computed, worst, sorted(passes)[len(passes) // 2] if passes else 0)


def pieces(lengths: list[int], bucket, cpu: bool) -> tuple[int, int]:
    """(rows, width) of the largest piece the trainer runs for a micro-batch of rows with these lengths."""
    rows = len(lengths)
    width = bucket(max(lengths)) if bucket else max(lengths)
    if not cpu or rows * width <= CPU_SPLIT_ABOVE or rows == 1:
        return rows, width
    n_pieces = min(rows, math.ceil(rows * width / CPU_PIECE_TOKENS))
    per_piece = math.ceil(rows / n_pieces)
    # the trainer slices consecutive rows and trims each piece to its longest row: the worst piece holds the longest
    longest = max(max(lengths[s:s + per_piece]) for s in range(0, rows, per_piece))
    return per_piece, bucket(longest) if bucket else longest


def measure(cfg: TrainConfig, tokenizer, name: str, records: list[dict] | None = None, model_path=None,
            amp_dtype: torch.dtype | None = None) -> DataSize:
    """Read (unless `records` are given), template, tokenise, truncate, split, mix in replay rows and pack the data
    as the trainer does (raises DataError). `model_path` and `amp_dtype` find a cached self-replay pool."""
    if records is None:
        records = load_records(cfg.dataset, cfg.dataset_dir, cfg.stage, cfg.max_samples)
    task = task_data(cfg, records, tokenizer)
    n_task = len(task.train)
    source = replay_source(cfg) if cfg.replay_ratio else None
    prompts = drawn_prompts(cfg, source, replay_count(n_task, cfg.replay_ratio)) if source and cfg.self_replay \
        else []
    pool, where = replay_pool(cfg, source, prompts, tokenizer, model_path, amp_dtype)
    if source is not None and pool is None:  # self-replay not generated yet: its answers at their longest
        data = prepare_data(cfg, records, tokenizer, task=task)
        extra = assumed_answers(cfg, prompts, tokenizer, n_task)
        rows = len(extra)
        if data.packed:  # rows packed without the replay rows: counted alone (an upper bound either way)
            extra = pack_examples(extra, cfg.cutoff_len)
        items = data.items + extra
    else:
        data = prepare_data(cfg, records, tokenizer, pool, task)
        items, rows = data.items, data.n_train - n_task  # the drawn rows that kept something to learn
    lengths = [len(it["input_ids"]) for it in items]
    labels = [sum(1 for x in it["labels"][1:] if x != IGNORE_INDEX) for it in items]
    task_tokens = sum(len(it["input_ids"]) for it in task.train)
    task_labels = sum(sum(1 for x in it["labels"][1:] if x != IGNORE_INDEX) for it in task.train)
    marked = sum(n for it, n in zip(items, labels) if it.get("replay") is True)  # what the KL term reads
    return DataSize(lengths, labels, n_task, data.packed, measured=True, tokenizer=name, replay_rows=rows,
                    replay_tokens=max(sum(lengths) - task_tokens, 0), replay_labels=max(sum(labels) - task_labels, 0),
                    kl_labels=marked if cfg.replay_kl_weight else 0, replay_source=where)


def replay_pool(cfg: TrainConfig, source, prompts: list[list[dict]], tokenizer, model_path,
                amp_dtype) -> tuple[Replay | None, str]:
    """(the pool the trainer would mix in, where it comes from); (None, "") without replay (`source` None), and
    (None, why) for self-replay of `prompts` that has not been generated yet."""
    if source is None:
        return None, ""
    if not cfg.self_replay:
        return Replay(source.records), f"the records of {source.name}"
    path = pool_file(cfg, prompts, tokenizer, model_path, amp_dtype) if model_path is not None else None
    if path is not None and path.is_file():
        return Replay(json.loads(path.read_text(encoding="utf-8"))["records"]), f"the cached self-replay pool {path}"
    return None, (f"self-replay answers not generated yet, each assumed at its longest, "
                  f"self_replay_max_new_tokens {cfg.self_replay_max_new_tokens}")


def assumed_answers(cfg: TrainConfig, prompts: list[list[dict]], tokenizer, n_task: int) -> list[dict]:
    """Self-replay rows before generation: the run's draw of `prompts`, each with an answer of
    self_replay_max_new_tokens tokens and its end token, all of them labels."""
    from ..data import get_template

    rows = replay_count(n_task, cfg.replay_ratio)
    template = get_template(cfg.template, tokenizer)
    answer = cfg.self_replay_max_new_tokens + 1
    out = []
    for prompt in sample_rows(prompts, rows, cfg.seed):
        n = min(len(template.prompt_ids(prompt)) + answer, cfg.cutoff_len)
        row = {"input_ids": [0] * n, "labels": [IGNORE_INDEX] * (n - answer) + [0] * min(answer, n)}
        out.append({**row, "replay": True} if cfg.replay_kl_weight else row)
    return out


def tokenizer_for(model_name_or_path: str | None):
    """(tokenizer, its name): the model's own when its folder has one, else the embedded default's."""
    from transformers import AutoTokenizer

    from ..models import resolve_model

    text = (model_name_or_path or "").strip()
    path = Path(text).expanduser() if text else None
    if path is not None and path.exists():
        folder = path.parent if path.is_file() else path
        if path.suffix.lower() == ".gguf":
            folder = resolve_model(text)
    elif text:
        folder = resolve_model(text)  # a hub id in the local cache, or the default by name
    else:
        folder = resolve_model(None)  # the embedded default, converted once as `lorakit train` would
    if any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return AutoTokenizer.from_pretrained(folder, local_files_only=True), "the model's own"
    default = resolve_model(None)
    return AutoTokenizer.from_pretrained(default, local_files_only=True), "SmolLM2-135M-Instruct's (the model has none)"
