"""Checkpoints in Hugging Face's layout, written atomically, and everything needed to resume exactly.

    output_dir/checkpoint-STEP/
        adapter_config.json, adapter_model.safetensors   the adapter in PEFT format (lora), or
        config.json, model.safetensors                   the model (full, freeze)
        adapter_resume.safetensors                       PiSSA/OLoRA only: the factors as trained (the PEFT file
                                                         holds them converted for the untouched base)
        optimizer.pt                                     AdamW state (+ the fp16 loss scaler)
        trainer_state.json                               the TrainerState (state.py): step, data position, examples
                                                         consumed, schedule, RNG states, last metrics

Every file here is read back by a resume. The learning rate is a pure function of the step and the schedule
(schedule.py), so the schedule saved in trainer_state.json is all a scheduler would have held; a resume checks it
against the run's own. A checkpoint is built in a temporary sibling and renamed into place (lorakit.files), so a
crash never leaves one that looks complete.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..files import staged_directory, staged_file
from ..lora import get_peft_model_state_dict, set_peft_model_state_dict
from .methods import Trainable
from .state import STATE_FILE, CheckpointError, Schedule, TrainerState

CHECKPOINT_PREFIX = "checkpoint-"
OPTIMIZER_FILE = "optimizer.pt"
RESUME_WEIGHTS_FILE = "adapter_resume.safetensors"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"

__all__ = ["CHECKPOINT_PREFIX", "CheckpointError", "list_checkpoints", "load_checkpoint", "resolve_resume",
           "save_checkpoint", "save_weights"]


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """checkpoint-STEP directories of a run, oldest (lowest step) first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def resolve_resume(value: str | bool | None, output_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: None, a given directory, or (True) the newest in output_dir."""
    if value is None or value is False:
        return None
    if value is True or str(value).lower() == "true":
        found = list_checkpoints(output_dir)
        if not found:
            raise CheckpointError(f"resume_from_checkpoint: true, but '{output_dir}' has no "
                                  f"{CHECKPOINT_PREFIX}* directory")
        return found[-1]
    path = Path(value)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"resume_from_checkpoint: '{path}' is not a checkpoint (no {STATE_FILE})")
    return path


def save_weights(trainable: Trainable, directory: Path) -> None:
    """The adapter (PEFT format) or the whole model (save_pretrained) into `directory`."""
    if trainable.lora is None:
        trainable.model.save_pretrained(directory)
        return
    trainable.lora.save_pretrained(directory)
    init = trainable.lora.peft_config["default"].init_lora_weights
    if isinstance(init, str) and init != "gaussian":  # PiSSA/OLoRA: the PEFT file is converted, keep the raw too
        raw = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(trainable.lora).items()}
        with staged_file(directory / RESUME_WEIGHTS_FILE) as tmp:
            save_file(raw, str(tmp), metadata={"format": "pt"})


def save_checkpoint(output_dir: str | Path, trainable: Trainable, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler | None, state: TrainerState, limit: int | None = None) -> Path:
    """Write checkpoint-STEP for `state` all at once (replacing one of that step a resumed run left), then keep
    only the newest `limit`."""
    root = Path(output_dir)
    final = root / f"{CHECKPOINT_PREFIX}{state.step}"
    with staged_directory(final) as tmp:
        save_weights(trainable, tmp)
        torch.save({"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None},
                   tmp / OPTIMIZER_FILE)
        state.save(tmp)
    if limit:
        for old in list_checkpoints(root)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, trainable: Trainable, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler | None, schedule: Schedule) -> TrainerState:
    """Check that `path` was made with this run's `schedule` (CheckpointError naming the first key that differs),
    then restore weights, optimizer (and scaler); returns its trainer state. Its RNG states are for the caller to
    restore (`state.restore_rng()`) last, so that nothing done while setting up the run disturbs them."""
    state = TrainerState.load(path)
    state.check_resumable_by(schedule, path.name)
    load_weights(path, trainable)
    saved = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    try:
        optimizer.load_state_dict(saved["optimizer"])
    except ValueError as exc:
        raise CheckpointError(f"{path}: the optimizer state does not fit this run ({exc}); "
                              "was it made with other finetuning settings?") from None
    if scaler is not None and saved.get("scaler"):
        scaler.load_state_dict(saved["scaler"])
    return state


def load_weights(path: Path, trainable: Trainable) -> None:
    if trainable.lora is not None:
        resume = path / RESUME_WEIGHTS_FILE
        source = resume if resume.is_file() else path / ADAPTER_WEIGHTS_FILE
        if not source.is_file():
            raise CheckpointError(f"{path}: no {ADAPTER_WEIGHTS_FILE}; was this checkpoint made by a full/freeze run?")
        device = next(trainable.model.parameters()).device
        try:
            set_peft_model_state_dict(trainable.lora, load_file(str(source), device=str(device)))
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"{path}: the adapter does not fit this run: {exc}") from None
        return
    files = sorted(f for f in path.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no model*.safetensors; was this checkpoint made by a lora run?")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    missing = {n for n, _ in trainable.named_trainable()} - set(state) - _tied_names(trainable.model)
    if missing:
        raise CheckpointError(f"{path}: weights missing for {len(missing)} trained tensors, e.g. {min(missing)}")
    trainable.model.load_state_dict(state, strict=False)


def _tied_names(model: torch.nn.Module) -> set[str]:
    """Parameter names that share storage with another parameter (save_pretrained writes those once)."""
    seen, tied = {}, set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.data_ptr() in seen:
            tied |= {name, seen[p.data_ptr()]}
        seen.setdefault(p.data_ptr(), name)
    return tied
