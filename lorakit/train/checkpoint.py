"""Checkpoints in Hugging Face's layout, written atomically, and everything needed to resume exactly.

    output_dir/checkpoint-STEP/
        adapter_config.json, adapter_model.safetensors   the adapter in PEFT format (lora), or
        config.json, model.safetensors                   the model (full, freeze)
        adapter_resume.safetensors                       PiSSA/OLoRA only: the factors as trained (the PEFT file
                                                         holds them converted for the untouched base)
        optimizer.pt                                     AdamW state (+ the fp16 loss scaler)
        scheduler.pt                                     the schedule: step, total, warmup, kind
        rng_state.pth                                    python, numpy, torch CPU and CUDA generators
        trainer_state.json                               step, epoch, data position, last metrics

A checkpoint is written under a temporary name and renamed into place, so a crash never leaves one that looks
complete. Resuming restores weights, optimizer, RNG and the data position, so a resumed run ends where an
uninterrupted one does.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..lora import get_peft_model_state_dict, set_peft_model_state_dict
from .methods import Trainable

PREFIX = "checkpoint-"
STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.pt"
SCHEDULER_NAME = "scheduler.pt"
RNG_NAME = "rng_state.pth"
RESUME_WEIGHTS = "adapter_resume.safetensors"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be found or does not fit the run; one line."""


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """checkpoint-STEP directories of a run, oldest (lowest step) first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and re.fullmatch(rf"{PREFIX}\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def resolve_resume(value: str | bool | None, output_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: None, a given directory, or (True) the newest in output_dir."""
    if value is None or value is False:
        return None
    if value is True or str(value).lower() == "true":
        found = list_checkpoints(output_dir)
        if not found:
            raise CheckpointError(f"resume_from_checkpoint: true, but '{output_dir}' has no {PREFIX}* directory")
        return found[-1]
    path = Path(value)
    if not (path / STATE_NAME).is_file():
        raise CheckpointError(f"resume_from_checkpoint: '{path}' is not a checkpoint (no {STATE_NAME})")
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
        save_file(raw, str(directory / RESUME_WEIGHTS), metadata={"format": "pt"})


def save_checkpoint(output_dir: str | Path, trainable: Trainable, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler | None, schedule: dict, state: dict,
                    limit: int | None = None) -> Path:
    """Write checkpoint-STEP atomically (temporary directory + rename), then keep only the newest `limit`."""
    root = Path(output_dir)
    final = root / f"{PREFIX}{state['global_step']}"
    tmp = root / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_weights(trainable, tmp)
    torch.save({"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None},
               tmp / OPTIMIZER_NAME)
    torch.save(schedule, tmp / SCHEDULER_NAME)
    torch.save(rng_state(), tmp / RNG_NAME)
    (tmp / STATE_NAME).write_text(json.dumps(state, indent=2) + "\n")
    if final.exists():  # a resumed run passing a step it saved before
        shutil.rmtree(final)
    tmp.rename(final)
    if limit:
        for old in list_checkpoints(root)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, trainable: Trainable, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler | None) -> dict:
    """Restore weights, optimizer (and scaler) from `path`; returns its trainer state. RNG is restored separately
    (`restore_rng`), last, so nothing done while setting up the run can disturb it."""
    load_weights(path, trainable)
    saved = torch.load(path / OPTIMIZER_NAME, map_location="cpu", weights_only=True)
    try:
        optimizer.load_state_dict(saved["optimizer"])
    except ValueError as exc:
        raise CheckpointError(f"{path}: the optimizer state does not fit this run ({exc}); "
                              "was it made with other finetuning settings?") from None
    if scaler is not None and saved.get("scaler"):
        scaler.load_state_dict(saved["scaler"])
    return json.loads((path / STATE_NAME).read_text())


def load_weights(path: Path, trainable: Trainable) -> None:
    if trainable.lora is not None:
        source = path / RESUME_WEIGHTS if (path / RESUME_WEIGHTS).is_file() else path / ADAPTER_WEIGHTS
        if not source.is_file():
            raise CheckpointError(f"{path}: no {ADAPTER_WEIGHTS}; was this checkpoint made by a full/freeze run?")
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


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(path: Path) -> None:
    state = torch.load(path / RNG_NAME, map_location="cpu", weights_only=False)  # our own file: python/numpy state
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
