"""The data set's size as the trainer will see it: examples, tokens, label tokens, the epoch's batches, and the
largest forward pass among them (the one that sets the activation peak).

The data are read, templated, tokenised, truncated, split and packed by the trainer's own `prepare_data`; the
batches are the trainer's epoch-0 order (`batch_order`, a pure function of the seed); on a CPU a batch above
`CPU_SPLIT_ABOVE` tokens is cut into pieces of rows as `cpu_levers.row_pieces` does, and in bf16 on a CPU token
counts are rounded up by the trainer's `shape_bucket`. Without a data set every micro-batch is assumed full:
batch x cutoff_len tokens, all of them labels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..data import IGNORE_INDEX, batch_order, load_records
from ..train.config import TrainConfig
from ..train.cpu_levers import CPU_PIECE_TOKENS, CPU_SPLIT_ABOVE
from ..train.prepare import prepare_data
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

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    @property
    def label_tokens(self) -> int:
        return sum(self.labels)

    def clipped(self, cutoff_len: int) -> DataSize:
        """The same items cut at a shorter cutoff_len (labels kept in proportion): for what-if advice."""
        lengths = [min(n, cutoff_len) for n in self.lengths]
        labels = [round(lab * m / n) if n else 0 for lab, m, n in zip(self.labels, lengths, self.lengths)]
        return DataSize(lengths, labels, self.examples, self.packed, self.measured, self.tokenizer)


@dataclass
class Epoch:
    """What one epoch computes: micro-batches, tokens with padding, and the largest single pass."""

    micro_batches: int
    computed_tokens: int
    worst: Workload


def assumed(cfg: TrainConfig) -> DataSize:
    """No data set: one optimizer step of full rows (cutoff_len tokens, all labels)."""
    n = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    return DataSize([cfg.cutoff_len] * n, [cfg.cutoff_len - 1] * n, n, bool(cfg.packing), measured=False)


def epoch(data: DataSize, cfg: TrainConfig, bucket, cpu: bool) -> Epoch:
    """The trainer's epoch-0 batches of `data` for `cfg` (module docstring)."""
    group = cfg.group_by_length and not data.packed
    batches = batch_order(data.lengths, cfg.per_device_train_batch_size, cfg.seed, 0, group_by_length=group)
    worst, computed = None, 0
    for batch in batches:
        lengths = [data.lengths[i] for i in batch]
        rows, width = pieces(lengths, bucket, cpu)
        full = bucket(max(lengths)) if bucket else max(lengths)
        computed += sum(lengths) if data.packed else full * len(lengths)
        if worst is None or rows * width > worst.tokens:
            top = sorted((data.labels[i] for i in batch), reverse=True)[:rows]
            worst = Workload(rows, width, sum(top), data.packed)
    return Epoch(len(batches), computed, worst)


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


def measure(cfg: TrainConfig, tokenizer, name: str, records: list[dict] | None = None) -> DataSize:
    """Read (unless `records` are given), template, tokenise, truncate, split and pack the data as the trainer
    does (raises DataError)."""
    if records is None:
        records = load_records(cfg.dataset, cfg.dataset_dir, cfg.stage, cfg.max_samples)
    data = prepare_data(cfg, records, tokenizer)
    lengths = [len(it["input_ids"]) for it in data.items]
    labels = [sum(1 for x in it["labels"][1:] if x != IGNORE_INDEX) for it in data.items]
    return DataSize(lengths, labels, data.n_train, data.packed, measured=True, tokenizer=name)


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
