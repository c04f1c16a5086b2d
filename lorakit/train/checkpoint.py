"""Checkpoints in Hugging Face's layout, written atomically, and everything needed to resume exactly.

    output_dir/checkpoint-STEP/
        adapter_config.json, adapter_model.safetensors   the adapter in PEFT format (lora), or
        config.json, model.safetensors                   the model (full, freeze)
        adapter_resume.safetensors                       PiSSA/OLoRA only: the factors as trained (the PEFT file
                                                         holds them converted for the untouched base)
        optimizer.pt                                     AdamW state (+ the fp16 loss scaler)
        trainer_state.json                               the TrainerState (state.py): step, data position, examples
                                                         consumed, schedule, RNG states, last metrics

With several ranks the files are the same, unsharded: rank 0 writes them (FSDP2's shards are gathered first,
every rank taking part: the whole model for full/freeze, only the adapter's tensors for lora), with every rank's
generators in trainer_state.json, and every rank reads them back (FSDP2: keeping its own shards), so a run
resumes at another world size.

Every file here is read back by a resume. The learning rate is a pure function of the step and the schedule
(schedule.py), so the schedule saved in trainer_state.json is all a scheduler would have held; a resume checks it
against the run's own. A checkpoint is built in a temporary sibling and renamed into place (lorakit.files), so a
crash never leaves one that looks complete.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..files import staged_directory, staged_file
from ..lora import get_peft_model_state_dict, set_peft_model_state_dict
from ..lora.io import adapter_tensors, write_adapter
from .distributed import World
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


def save_weights(trainable: Trainable, directory: Path, state_dict: dict | None = None) -> None:
    """The adapter (PEFT format) or the whole model (save_pretrained) into `directory`; `state_dict`: FSDP2's
    gathered weights (`gathered_weights`)."""
    if trainable.lora is None:
        trainable.model.save_pretrained(directory, state_dict=state_dict)
        return
    if state_dict is not None:  # a plain adapter (plan_for refuses the converted ones under FSDP2)
        config = trainable.lora.peft_config[trainable.lora.active_adapter]
        write_adapter(directory, dataclasses.replace(config, inference_mode=True), state_dict)
        return
    trainable.lora.save_pretrained(directory)
    init = trainable.lora.peft_config["default"].init_lora_weights
    if isinstance(init, str) and init != "gaussian":  # PiSSA/OLoRA: the PEFT file is converted, keep the raw too
        raw = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(trainable.lora).items()}
        with staged_file(directory / RESUME_WEIGHTS_FILE) as tmp:
            save_file(raw, str(tmp), metadata={"format": "pt"})


def save_checkpoint(output_dir: str | Path, trainable: Trainable, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler | None, state: TrainerState, limit: int | None = None,
                    world: World | None = None, sharded: bool = False) -> Path:
    """Write checkpoint-STEP for `state` all at once (replacing one of that step a resumed run left), then keep
    only the newest `limit`. With several ranks every rank calls this (the gathers), rank 0 alone writes;
    `sharded`: the model is FSDP2's."""
    world = world or World.single()
    root = Path(output_dir)
    final = root / f"{CHECKPOINT_PREFIX}{state.step}"
    if world.distributed:
        state = dataclasses.replace(state, rng_by_rank=world.gather(state.rng))
    weights = gathered_weights(trainable) if sharded else None
    optimizer_state = gathered_optimizer(trainable.model, optimizer) if sharded else optimizer.state_dict()
    if not world.is_main:
        return final
    with staged_directory(final) as tmp:
        save_weights(trainable, tmp, weights)
        torch.save({"optimizer": optimizer_state, "scaler": scaler.state_dict() if scaler else None},
                   tmp / OPTIMIZER_FILE)
        state.save(tmp)
    if limit:
        for old in list_checkpoints(root)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, trainable: Trainable, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler | None, schedule: Schedule, sharded: bool = False) -> TrainerState:
    """Check that `path` was made with this run's `schedule` (CheckpointError naming the first key that differs),
    then restore weights, optimizer (and scaler); returns its trainer state. Its RNG states are for the caller to
    restore (`state.restore_rng()`) last, so that nothing done while setting up the run disturbs them.
    `sharded`: the model is FSDP2's (every rank reads the whole files and keeps its shards)."""
    state = TrainerState.load(path)
    state.check_resumable_by(schedule, path.name)
    load_weights(path, trainable, sharded)
    saved = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    try:
        by_name = any(isinstance(k, str) for k in saved["optimizer"].get("state", {}))
        if sharded or by_name:
            load_optimizer_by_name(trainable.model, optimizer, saved["optimizer"])
        else:
            optimizer.load_state_dict(saved["optimizer"])
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: the optimizer state does not fit this run ({exc}); "
                              "was it made with other finetuning settings?") from None
    if scaler is not None and saved.get("scaler"):
        scaler.load_state_dict(saved["scaler"])
    return state


def load_weights(path: Path, trainable: Trainable, sharded: bool = False) -> None:
    if trainable.lora is not None:
        resume = path / RESUME_WEIGHTS_FILE
        source = resume if resume.is_file() else path / ADAPTER_WEIGHTS_FILE
        if not source.is_file():
            raise CheckpointError(f"{path}: no {ADAPTER_WEIGHTS_FILE}; was this checkpoint made by a full/freeze run?")
        device = next(trainable.model.parameters()).device
        state = load_file(str(source), device=str(device))
        try:
            if sharded:
                state = as_shards(trainable, state)
            set_peft_model_state_dict(trainable.lora, state)
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
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(trainable.model, state, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        trainable.model.load_state_dict(state, strict=False)


# ---------------------------------------------------------------- FSDP2: whole tensors to and from the shards


def gathered_weights(trainable: Trainable) -> dict[str, torch.Tensor]:
    """What `save_weights` writes of an FSDP2 model, whole, on the CPU (every rank must call it: it all-gathers):
    for full/freeze every weight, on rank 0 alone; for lora the adapter's tensors only, under PEFT file keys, on
    every rank (one all-gather per tensor, in the same order on every rank; the frozen base is never gathered)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if trainable.lora is None:
        return get_model_state_dict(trainable.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    lora = trainable.lora
    live = adapter_tensors(lora.model, lora.active_adapter, lora.peft_config[lora.active_adapter].bias)
    return {key: _whole(tensor).detach().to("cpu").contiguous().clone() for key, tensor in live.items()}


def as_shards(trainable: Trainable, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A whole adapter (PEFT file keys) cut into this rank's shards of the live FSDP2 tensors (no communication:
    every rank read the same file); keys the model lacks stay as they are, for the load's own error."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    lora = trainable.lora
    live = adapter_tensors(lora.model, lora.active_adapter, lora.peft_config[lora.active_adapter].bias)
    out = {}
    for key, tensor in state.items():
        target = live.get(key)
        if isinstance(target, DTensor) and tuple(target.shape) == tuple(tensor.shape):
            tensor = distribute_tensor(tensor.to(target.dtype), target.device_mesh, target.placements,
                                       src_data_rank=None)
        out[key] = tensor
    return out


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of an FSDP2 shard (an all-gather; a CPU-offloaded shard travels through the mesh's device)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(tensor, DTensor):
        return tensor
    if tensor.device.type != tensor.device_mesh.device_type:
        tensor = tensor.to(tensor.device_mesh.device_type)
    return tensor.full_tensor()


def gathered_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The AdamW state of an FSDP2 model, whole and keyed by parameter name, on rank 0's CPU (every rank calls)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                cpu_offload=True))


def load_optimizer_by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Load a whole optimizer state into `optimizer` (sharded or not); `saved` keyed by parameter name (an FSDP2
    run's) or by position (a plain one's, converted to names first)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if not any(isinstance(k, str) for k in saved.get("state", {})):
        names = {id(p): n for n, p in model.named_parameters()}
        order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
        saved = {"state": {order[i]: v for i, v in saved["state"].items()},
                 "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, saved, options=StateDictOptions(full_state_dict=True))


def _tied_names(model: torch.nn.Module) -> set[str]:
    """Parameter names that share storage with another parameter (save_pretrained writes those once)."""
    seen, tied = {}, set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.data_ptr() in seen:
            tied |= {name, seen[p.data_ptr()]}
        seen.setdefault(p.data_ptr(), name)
    return tied
