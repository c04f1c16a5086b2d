"""Before training: check everything that can be checked without a model (all problems at once), then turn the
records into training rows and a validation split once the tokenizer is there."""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..data import (
    DataError,
    check_template,
    encode_records,
    get_template,
    load_records,
    pack_examples,
    split_validation,
)
from ..data.replay import Replay, mix_replay
from ..files import TEMP_PREFIX
from ..models import ModelError, resolve_model
from .checkpoint import CHECKPOINT_PREFIX, CheckpointError, resolve_resume
from .config import TrainConfig
from .self_replay import ReplaySource, replay_source

# Files a previous run leaves in output_dir; overwrite_output_dir removes these (and checkpoint-*) only.
RUN_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_resume.safetensors", "model.safetensors",
             "model.safetensors.index.json", "metrics.jsonl", "train_results.json", "trainer_state.json",
             "training_args.yaml", "training_loss.png", "training_eval_loss.png")


class TrainError(ValueError):
    """Problems found before training; the message lists all of them, one per line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        text = problems[0] if len(problems) == 1 else "\n".join(f"  - {p}" for p in problems)
        super().__init__(text if len(problems) == 1 else f"{len(problems)} problems:\n{text}")


@dataclass
class Plan:
    """What the checks found: the records, the model directory, the checkpoint to resume from."""

    records: list[dict]
    model_path: Path
    resume: Path | None
    replay: ReplaySource | None = None  # replay_dataset's records or self-replay prompts (replay_ratio > 0)


def preflight(cfg: TrainConfig) -> Plan:
    """Read the data, find the model, check output_dir and the checkpoint; raise TrainError with every problem.

    Nothing is written (except a one-time conversion of a GGUF model into lorakit's cache).
    """
    problems = []
    records, model_path, resume, replay = [], None, None, None
    try:
        records = load_records(cfg.dataset, cfg.dataset_dir, cfg.stage, cfg.max_samples)
    except DataError as exc:
        problems.append(str(exc))
    try:
        replay = replay_source(cfg)
    except DataError as exc:
        problems.append(str(exc))
    try:
        check_template(cfg.template)
    except DataError as exc:
        problems.append(str(exc))
    try:
        resume = resolve_resume(cfg.resume_from_checkpoint, cfg.output_dir)
    except CheckpointError as exc:
        problems.append(str(exc))
    if resume is None and not cfg.resume_from_checkpoint:
        problems += output_dir_problems(cfg)
    if not problems or not _is_default(cfg.model_name_or_path):  # don't convert the default just to fail after
        try:
            model_path = resolve_model(cfg.model_name_or_path)
        except ModelError as exc:
            problems.append(str(exc))
    if problems:
        raise TrainError(problems)
    return Plan(records, model_path, resume, replay)


def _is_default(name: str | None) -> bool:
    return not (name or "").strip() or name.strip().lower() in ("default", "smollm2-135m-instruct")


def output_dir_problems(cfg: TrainConfig) -> list[str]:
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        return [f"output_dir '{out}' is a file"]
    if not out.is_dir() or cfg.overwrite_output_dir:
        return []
    held = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    if not held:
        return []
    shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
    return [f"output_dir '{out}' already holds another run ({shown}); set overwrite_output_dir: true to replace "
            f"it, resume_from_checkpoint: true to continue it, or choose another output_dir"]


def clear_previous_run(output_dir: str | Path) -> list[str]:
    """Remove what an earlier run left in output_dir (overwrite_output_dir); other files stay. Returns names."""
    out = Path(output_dir)
    removed = []
    for path in sorted(out.iterdir()) if out.is_dir() else []:
        if path.is_dir() and path.name.startswith((CHECKPOINT_PREFIX, TEMP_PREFIX + CHECKPOINT_PREFIX)):
            shutil.rmtree(path)
            removed.append(path.name)
        elif path.is_file() and (path.name in RUN_FILES or path.name.startswith("model-0")):
            path.unlink()
            removed.append(path.name)
    return removed


@dataclass
class Data:
    """Training items (examples, or packed rows), validation examples, and what encoding reported."""

    items: list[dict]
    val: list[dict]
    stats: dict
    n_train: int
    packed: bool

    def describe(self, cfg: TrainConfig) -> str:
        s = self.stats
        split = f" ({self.n_train} train, {len(self.val)} validation)" if self.val else ""
        line = (f"data: {s['records']} records -> {s['examples']} examples{split}, {s['tokens']:,d} tokens, "
                f"{s['label_tokens']:,d} with loss")
        if s.get("truncated"):
            line += f"; {s['truncated']} truncated at cutoff_len {cfg.cutoff_len} ({s['tokens_cut']:,d} tokens cut)"
        if s.get("split"):
            line += f"; {s['split']} extra examples from texts longer than cutoff_len"
        if s.get("dropped_no_labels"):
            line += f"; {s['dropped_no_labels']} dropped (no label token left)"
        if s.get("replay"):
            line += f"\n{s['replay']}"
        if self.packed:
            fill = sum(len(r["input_ids"]) for r in self.items) / (len(self.items) * cfg.cutoff_len)
            line += f"\npacking: {self.n_train} examples in {len(self.items)} rows of <= {cfg.cutoff_len} tokens " \
                    f"({100 * fill:.0f}% full)"
        return line


@dataclass
class TaskData:
    """The task's examples after tokenising and the validation split, before any replay rows join them."""

    train: list[dict]
    val: list[dict]
    stats: dict


def task_data(cfg: TrainConfig, records: list[dict], tokenizer) -> TaskData:
    """Template, tokenise, truncate, split off validation (may raise DataError)."""
    template = get_template(cfg.template, tokenizer) if cfg.stage == "sft" else None
    examples, stats = encode_records(records, tokenizer, template, cutoff_len=cfg.cutoff_len,
                                     train_on_prompt=cfg.train_on_prompt, stage=cfg.stage)
    val_size = int(cfg.val_size) if cfg.val_size >= 1 else cfg.val_size
    train, val = split_validation(examples, val_size, cfg.seed)
    return TaskData(train, val, stats)


def prepare_data(cfg: TrainConfig, records: list[dict], tokenizer, replay: Replay | None = None,
                 task: TaskData | None = None) -> Data:
    """Template, tokenise, truncate, split off validation (or take `task`, made by `task_data`), mix in replay
    rows, pack (all may raise DataError; nothing is written)."""
    task = task or task_data(cfg, records, tokenizer)
    train, val, stats = task.train, task.val, task.stats
    template = get_template(cfg.template, tokenizer) if cfg.stage == "sft" else None
    if replay is not None:  # replay rows join the training examples only, never the validation split
        def encode(record: dict) -> dict | None:
            rows, _ = encode_records([record], tokenizer, template, cutoff_len=cfg.cutoff_len)
            if not rows:
                return None
            # the KL term, the null space and the task directions read the mark
            marked = cfg.replay_kl_weight or cfg.replay_null_space or cfg.replay_task_directions
            return {**rows[0], "replay": True} if marked else rows[0]

        train, line = mix_replay(train, replay.records, cfg.replay_ratio, cfg.seed, encode)
        kl = f"; KL to the base on their labels, weight {cfg.replay_kl_weight:g}" if cfg.replay_kl_weight else ""
        kl += f"; each of their tokens' loss counted {cfg.replay_loss_weight:g} times" \
            if cfg.replay_loss_weight != 1 else ""
        stats = {**stats, "replay": f"{line}{kl}; {replay.source}"}
    items = pack_examples(train, cfg.cutoff_len) if cfg.packing else train
    return Data(items, val, stats, len(train), bool(cfg.packing))


def steps_per_epoch(n_batches: int, accumulation: int) -> int:
    """Optimizer steps in one pass: the last step of an epoch may have fewer micro-batches."""
    return math.ceil(n_batches / accumulation)
