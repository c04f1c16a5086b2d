"""The training loop: `train(config)` checks, loads, trains, evaluates, checkpoints and saves.

One optimizer step:

    micro-batches = the next gradient_accumulation_steps batches of this epoch (fewer at the epoch's end)
    N = label tokens in all of them
    for each micro-batch: loss_sum, _ = causal_lm_loss(...); (loss_sum / N).backward()
        (on a CPU a micro-batch of more than CPU_SPLIT_ABOVE tokens goes through in pieces of rows: cpu_levers.py)
    clip to max_grad_norm; lr = base_lr * schedule(step); AdamW step

so the step's loss is the mean over its label tokens, whatever their split into micro-batches. With several ranks
(distributed.py, sharding.py) each global micro-batch is split by rank (`rank_share`), N is summed over the ranks
before the backward, each rank's loss is scaled by the world size (DDP / FSDP2 average gradients), the gradients
sync on the last backward of the step only, and rank 0 alone prints and writes. The run's position
is one TrainerState (state.py) as of the last completed step: the data order is a pure function of (seed, epoch),
and the random number generators are captured at each step boundary, before the step's first micro-batch, so a
resumed run draws the same batches and the same dropout masks as an uninterrupted one. Ctrl-C finishes nothing
half-way: the current step is dropped, a checkpoint of the last complete step is written (with the generators as
they were before the dropped step), and the run ends (a second Ctrl-C aborts at once).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..adapters import TRAINING_ARGS
from ..data import batch_order, collate_packed, pad_collate
from ..data.batching import rank_share
from ..data.replay import replay_count
from ..device import autocast_dtype, pick_device
from ..files import write_file
from ..models import load_model
from . import checkpoint as ckpt
from .config import TrainConfig
from .cpu_levers import CPU_PIECE_TOKENS, CPU_SPLIT_ABOVE, apply_model_levers, row_pieces, token_rounding
from .distributed import World, joined
from .loraga_init import estimate_lora_ga
from .loss import (
    IGNORE_INDEX,
    TEACHER_KEY,
    Distill,
    causal_lm_loss,
    check_chunked_route,
    distill_problem,
    shifted_targets,
)
from .methods import Trainable, lora_config_for, make_optimizer, make_trainable, quantization_of
from .null_space import NullSpace
from .null_space import measure as measure_null_space
from .prepare import Data, clear_previous_run, preflight, prepare_data, steps_per_epoch, task_data
from .rank_allocation import RankAllocation
from .report import MetricsLog, plot_loss
from .schedule import get_lr, warmup_steps_for
from .self_replay import build_replay
from .sharding import Sharded, load_device, plan_for, shard
from .startup import startup_lines
from .state import Schedule, TrainerState, capture_rng
from .teacher import MAX_BYTES as TEACHER_MAX_BYTES
from .teacher import TeacherStates, compute_states, hidden_size_of, planned_bytes

RESULTS_FILE = "train_results.json"  # written beside the adapter, with TRAINING_ARGS (training_args.yaml)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def say(text: str) -> None:
    tqdm.write(text, file=sys.stderr)


class Interrupt:
    """Turns the first Ctrl-C into a flag the loop checks between micro-batches; the second one aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> Interrupt:
        with contextlib.suppress(ValueError):  # signal handlers can only be set from the main thread
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        say("lorakit: interrupted; saving a checkpoint of the last complete step (Ctrl-C again to abort)")

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class Trainer:
    """The state of one run and the loop over its optimizer steps."""

    def __init__(self, cfg: TrainConfig, trainable: Trainable, tokenizer, data: Data, device: torch.device,
                 amp_dtype: torch.dtype | None, world: World | None = None) -> None:
        self.cfg, self.trainable, self.tokenizer, self.data = cfg, trainable, tokenizer, data
        self.model = trainable.model
        self.world = world or World.single()
        self.sharded: Sharded | None = None  # DDP / FSDP2 around the loss, with several ranks (`distribute`)
        self.device, self.amp_dtype = device, amp_dtype
        self.round_width = token_rounding(device, amp_dtype or next(self.model.parameters()).dtype)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.optimizer = make_optimizer(trainable, cfg)
        self.scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
        self.lengths = [len(it["input_ids"]) for it in data.items]
        self._orders: dict[int, list[list[int]]] = {}
        self.n_batches = len(self.epoch_order(0))
        self.per_epoch = steps_per_epoch(self.n_batches, cfg.gradient_accumulation_steps)
        total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * self.per_epoch)
        self.schedule = Schedule(
            total_steps=total, warmup_steps=warmup_steps_for(total, cfg.warmup_steps, cfg.warmup_ratio),
            lr_scheduler_type=cfg.lr_scheduler_type, learning_rate=cfg.learning_rate, max_steps=cfg.max_steps,
            num_train_epochs=cfg.num_train_epochs, per_device_train_batch_size=cfg.per_device_train_batch_size,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps, batches_per_epoch=self.n_batches,
            seed=cfg.seed, world_size=self.world.size)
        self.state = TrainerState(self.schedule)  # as of the last completed step
        self.ranks = RankAllocation(trainable.lora, total) if cfg.use_adalora else None  # AdaLoRA's schedule
        self.inside_step = False  # from a step's boundary until its optimizer step is done
        self.chunked = True
        self.distill = Distill(cfg.replay_kl_weight, trainable.lora.disable_adapter, cfg.replay_loss_weight) \
            if cfg.replay_kl_weight and trainable.lora is not None else None  # replay rows learn the base too
        self.teacher: TeacherStates | None = None  # the base's states on replay rows, once (`keep_teacher_states`)
        self.teacher_note = ""  # the start-up line about them
        self.null_space: NullSpace | None = None  # the directions each LoRA A keeps (`keep_null_space`)
        self.null_space_note = ""  # the start-up line about them
        self.window = {"loss": 0.0, "steps": 0, "tokens": 0, "seconds": 0.0}  # since the last metrics line
        self.run_tokens, self.run_seconds, self.run_losses = 0, 0.0, []  # this process's steps

    # --- data order --------------------------------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> list[list[int]]:
        """Item indices of each global micro-batch of `epoch` (per device x world size items; each rank trains on
        its `rank_share`): seeded shuffle, or the file order."""
        if epoch not in self._orders:
            bs = self.cfg.per_device_train_batch_size * self.world.size
            if self.cfg.disable_shuffling:
                n = len(self.lengths)
                self._orders[epoch] = [list(range(i, min(i + bs, n))) for i in range(0, n, bs)]
            else:
                group = self.cfg.group_by_length and not self.data.packed
                self._orders[epoch] = batch_order(self.lengths, bs, self.cfg.seed, epoch, group_by_length=group)
            self._orders.pop(epoch - 2, None)
        return self._orders[epoch]

    def collate(self, indices: list[int]) -> tuple[dict, int, int]:
        """(batch on the device, real (non-padding) tokens in it, label tokens in it), counted on the CPU."""
        chunk = [self.data.items[i] for i in indices]
        collate = collate_packed if self.data.packed else pad_collate
        batch = collate(chunk, self.pad_id, round_width=self.round_width)
        cached = self.teacher.batch(indices, batch["input_ids"].shape[1]) if self.teacher is not None else None
        if cached is not None:
            batch[TEACHER_KEY] = cached  # (B, T, H)
        n_labels = int((shifted_targets(batch["labels"], batch.get("position_ids")) != IGNORE_INDEX).sum())
        on_device = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        return on_device, sum(len(c["input_ids"]) for c in chunk), n_labels

    def next_group(self) -> list[list[int]]:
        order, start = self.epoch_order(self.state.epoch), self.state.batch_in_epoch
        return order[start:min(start + self.cfg.gradient_accumulation_steps, len(order))]

    def complete_step(self, group: list[list[int]]) -> bool:
        """Count a finished step and move the data position past its micro-batches; True when it ended an epoch."""
        s = self.state
        s.step, s.batch_in_epoch = s.step + 1, s.batch_in_epoch + len(group)
        s.examples_consumed += sum(len(indices) for indices in group)
        if s.batch_in_epoch >= self.n_batches:
            s.epoch, s.batch_in_epoch = s.epoch + 1, 0
            return True
        return False

    @property
    def step(self) -> int:
        """Optimizer steps completed."""
        return self.state.step

    @property
    def epoch_float(self) -> float:
        return self.state.epoch_float()

    # --- one step ----------------------------------------------------------------------------------------------
    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_step(self, interrupt: Interrupt) -> dict | None:
        """One optimizer step; None when interrupted before it completed (its gradients are dropped, and the state
        stays that of the last completed step, generators included)."""
        self.state.rng = capture_rng()  # the step boundary: nothing of this step has drawn a random number yet
        self.inside_step = True
        sched = self.schedule
        lr_scale = get_lr(self.step, 1.0, sched.total_steps, sched.warmup_steps, sched.lr_scheduler_type)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_scale
        indices = self.next_group()
        shares = [rank_share(ix, self.world.rank, self.world.size) for ix in indices]  # (this rank's part, padding)
        batches = [self.collate(part) for part, _ in shares]
        weights = [0.0 if padding else 1.0 for _, padding in shares]  # a padding part trains with weight 0
        mine = sum(n * w for (_, _, n), w in zip(batches, weights))
        n_labels = max(self.world.sum([mine])[0], 1)  # the step's loss is the mean over all these tokens (all ranks)
        loss_sum = torch.zeros((), device=self.device)
        for i, ((batch, _, _), weight) in enumerate(zip(batches, weights)):
            pieces = [batch] if self.fsdp else self.pieces(batch)  # FSDP2 gathers weights in each forward: one per rank
            for j, piece in enumerate(pieces):
                with self.sync(last=i == len(batches) - 1 and j == len(pieces) - 1):
                    with self.autocast():
                        part, _ = self.forward_loss(piece)
                    scaled = part * (weight * self.world.size) / n_labels  # ranks' gradients are averaged
                    (self.scaler.scale(scaled) if self.scaler else scaled).backward()
                loss_sum += part.detach() * weight
            if interrupt.requested and not self.world.distributed:
                self.optimizer.zero_grad(set_to_none=True)
                return None
        mine_tokens = sum(n * w for (_, n, _), w in zip(batches, weights))
        total_loss, tokens, stop = self.world.sum([float(loss_sum), mine_tokens, float(interrupt.requested)])
        if stop:  # a Ctrl-C on any rank: every rank drops this step
            self.optimizer.zero_grad(set_to_none=True)
            return None
        if self.ranks is not None:  # AdaLoRA's orthogonality penalty, once per step
            penalty = self.ranks.penalty()
            (self.scaler.scale(penalty) if self.scaler else penalty).backward()
        grad_norm = self.clip()
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.ranks is not None:  # AdaLoRA's budget and masks, with this step's gradients
            self.ranks.after_optimizer_step(self.step)
        if self.null_space is not None:  # A back onto the directions it keeps
            self.null_space.project()
        self.optimizer.zero_grad(set_to_none=True)
        ended_epoch = self.complete_step(indices)
        self.inside_step = False
        return {"loss": total_loss / n_labels, "lr": self.cfg.learning_rate * lr_scale, "grad_norm": grad_norm,
                "tokens": int(tokens), "ended_epoch": ended_epoch}

    def keep_teacher_states(self) -> None:
        """For the KL term: the base's hidden states on the replay rows, computed now instead of at every step
        (teacher.py), when the rows are not packed and the states fit MAX_BYTES; `teacher_note` says which."""
        if self.distill is None:
            return
        planned = planned_bytes(self.data.items, hidden_size_of(self.model), self.amp_dtype or torch.float32)
        if self.data.packed or planned > TEACHER_MAX_BYTES:
            why = "packed rows" if self.data.packed else f"{planned / 2**20:.0f} MB would exceed " \
                f"{TEACHER_MAX_BYTES >> 20} MB"
            self.teacher_note = f"KL to the base: its forward runs on the replay rows of every step ({why})"
            return
        start = time.perf_counter()
        self.teacher = compute_states(self.model, self.data.items, self.distill.base, self.autocast, self.device,
                                      self.pad_id, store_dtype=self.amp_dtype)
        self.teacher_note = (f"KL to the base: its hidden states on the {len(self.teacher.states)} replay rows "
                             f"computed once ({self.teacher.nbytes / 2**20:.1f} MB, "
                             f"{time.perf_counter() - start:.1f} s), not at every step")

    def keep_null_space(self) -> None:
        """replay_null_space / replay_task_directions: measure the directions every LoRA A keeps (null_space.py)
        and project A onto them now, before the first step (B is 0 there, so the model is unchanged);
        `null_space_note`."""
        energy, directions = self.cfg.replay_null_space, self.cfg.replay_task_directions
        if not (energy or directions):
            return
        start = time.perf_counter()
        self.null_space = measure_null_space(self.model, self.data.items, self.trainable.lora.disable_adapter,
                                             self.autocast, self.device, self.pad_id, energy, directions)
        self.null_space.project(keep_norm=bool(directions))
        took = f"{len(self.null_space.keep)} layers, {time.perf_counter() - start:.1f} s"
        self.null_space_note = (
            f"task directions: every LoRA A kept in the {directions} input directions per layer where the task "
            f"rows' input energy is largest relative to the replay rows' ({took})" if directions else
            f"null space: every LoRA A kept out of the input directions holding {energy:g} of the replay rows' "
            f"input energy ({took}, {self.null_space.removed:.0%} of their input directions)")

    def forward_loss(self, batch: dict) -> tuple[torch.Tensor, int]:
        """(loss summed over label tokens, their count): through DDP / FSDP2 with several ranks."""
        if self.sharded is None:
            return causal_lm_loss(self.model, batch, chunked=self.chunked, distill=self.distill)
        return self.sharded.loss(batch, self.chunked, self.distill)

    def sync(self, last: bool):
        """The gradient reduction runs in the last backward of a step only (DDP no_sync, FSDP2 gradient sync)."""
        return contextlib.nullcontext() if self.sharded is None else self.sharded.sync(last)

    def distribute(self, plan) -> None:
        """Wrap the model for several ranks (sharding.py), then remake the optimizer over the parameters it left."""
        self.sharded = shard(self.trainable, plan, self.world, self.device, bool(self.cfg.ddp_find_unused_parameters))
        self.optimizer = make_optimizer(self.trainable, self.cfg)

    def pieces(self, batch: dict) -> list[dict]:
        """The forward passes the micro-batch runs as (`cpu_levers.row_pieces`): itself, or on a CPU, pieces of
        rows."""
        return row_pieces(batch, self.device, self.round_width, CPU_SPLIT_ABOVE, CPU_PIECE_TOKENS)

    def clip(self) -> float:
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        limit = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, limit)  # FSDP2: a DTensor, the norm over every shard
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Loss over every label token of the validation split, and its perplexity; with several ranks each takes
        its share of every global eval batch and the sums are reduced."""
        self.model.eval()
        val = sorted(self.data.val, key=lambda e: len(e["input_ids"]))  # similar lengths together: less padding
        total, count = 0.0, 0
        bs = self.cfg.per_device_eval_batch_size * self.world.size
        for start in range(0, len(val), bs):
            part_ix, padding = rank_share(list(range(start, min(start + bs, len(val)))), self.world.rank,
                                          self.world.size)
            chunk = pad_collate([val[i] for i in part_ix], self.pad_id, round_width=self.round_width)
            batch = {k: v.to(self.device) for k, v in chunk.items()}
            with self.autocast():
                part, n = self.forward_loss(batch)
            if not padding:
                total, count = total + float(part), count + n
        total, count = self.world.sum([total, count])
        self.model.train()
        loss = total / max(count, 1)
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}

    # --- checkpoints -------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """checkpoint-STEP of the last completed step. Between steps the generators are captured as they stand
        now; after a dropped step the state keeps those of that step's boundary."""
        if not self.inside_step:
            self.state.rng = capture_rng()
        return ckpt.save_checkpoint(self.cfg.output_dir, self.trainable, self.optimizer, self.scaler, self.state,
                                    self.cfg.save_total_limit, self.world, self.fsdp)

    @property
    def fsdp(self) -> bool:
        return self.sharded is not None and self.sharded.fsdp

    def resume(self, path: Path) -> None:
        """Continue from checkpoint `path`; CheckpointError (one line) when its schedule is not this run's."""
        if self.ranks is not None:
            raise ckpt.CheckpointError(f"{path}: an AdaLoRA run cannot resume yet (its importance scores are not in "
                                       f"the checkpoint); start it again without resume_from_checkpoint")
        self.state = ckpt.load_checkpoint(path, self.trainable, self.optimizer, self.scaler, self.schedule, self.fsdp)
        saved_ranks = len(self.state.rng_by_rank) or 1
        if not self.state.restore_rng(self.world.rank, self.world.size) and self.world.is_main:  # last: see above
            say(f"resume: {path.name} was made by {saved_ranks} rank(s), this run has {self.world.size}: the same "
                f"data order; ranks the checkpoint did not have start fresh random generators (dropout only)")

    # --- the loop ----------------------------------------------------------------------------------------------
    def run(self, log: MetricsLog | None, on_step=None) -> str:
        """Train up to the last step: "completed", or "interrupted" (after saving a checkpoint)."""
        bar = tqdm(total=self.schedule.total_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   file=sys.stderr, mininterval=0.5, disable=not self.world.is_main)
        status = "completed"
        alone = not self.world.distributed  # with several ranks only the flag the ranks agree on (train_step) counts
        with Interrupt() as interrupt:
            try:
                while self.step < self.schedule.total_steps and not (interrupt.requested and alone):
                    t0 = time.perf_counter()
                    out = self.train_step(interrupt)
                    if out is None:
                        status = "interrupted"
                        break
                    out["seconds"] = time.perf_counter() - t0
                    self.show(out, bar)
                    self.after_step(out, log)
                    if on_step is not None:
                        on_step(self)
            except KeyboardInterrupt:
                if interrupt.requested:  # the second Ctrl-C: abort without saving
                    raise
                interrupt.requested = True  # one that did not come through the handler (e.g. not the main thread)
                self.optimizer.zero_grad(set_to_none=True)
            finally:
                bar.close()  # before any error is printed
            if interrupt.requested and alone:
                status = "interrupted"
        if status == "interrupted":
            if self.step > 0:
                saved = self.save_checkpoint()  # every rank: the gathers
                self.say(f"lorakit: checkpoint saved to {saved}; continue with resume_from_checkpoint=true")
            else:
                self.say("lorakit: interrupted before the first step finished; nothing to save")
        return status

    def say(self, text: str) -> None:
        """A line on stderr, from rank 0 only."""
        if self.world.is_main:
            say(text)

    def show(self, out: dict, bar: tqdm) -> None:
        """Progress bar: this step's loss and lr, real (non-padding) input tokens per second of training."""
        self.run_tokens, self.run_seconds = self.run_tokens + out["tokens"], self.run_seconds + out["seconds"]
        self.run_losses.append(out["loss"])
        bar.update(1)
        bar.set_postfix(loss=f"{out['loss']:.4f}", lr=f"{out['lr']:.2e}",
                        tok_s=f"{self.run_tokens / self.run_seconds:.0f}")

    def after_step(self, out: dict, log: MetricsLog | None) -> None:
        """Log (rank 0: `log`; None on the other ranks), evaluate and checkpoint as the config asks."""
        cfg, w = self.cfg, self.window
        w["loss"], w["steps"] = w["loss"] + out["loss"], w["steps"] + 1
        w["tokens"], w["seconds"] = w["tokens"] + out["tokens"], w["seconds"] + out["seconds"]
        last_step = self.step == self.schedule.total_steps
        if self.step % cfg.logging_steps == 0 or last_step:
            record = {"step": self.step, "epoch": round(self.epoch_float, 4), "loss": round(w["loss"] / w["steps"], 6),
                      "lr": out["lr"], "grad_norm": round(out["grad_norm"], 6),
                      "tokens_per_second": round(w["tokens"] / max(w["seconds"], 1e-9), 1)}
            if log is not None:
                log.write(record)
            self.state.last_metrics.update(record)
            self.window = {"loss": 0.0, "steps": 0, "tokens": 0, "seconds": 0.0}
        by_steps = cfg.eval_strategy == "steps" and self.step % cfg.eval_steps == 0
        if self.data.val and (by_steps or (cfg.eval_strategy == "epoch" and out["ended_epoch"]) or last_step):
            metrics = self.evaluate()
            if log is not None:
                log.write({"step": self.step, "epoch": round(self.epoch_float, 4), **metrics})
            self.state.last_metrics.update(metrics)
            self.say(f"step {self.step}: eval_loss {metrics['eval_loss']:.4f}, "
                     f"perplexity {metrics['eval_perplexity']:.2f}")
        if (cfg.save_strategy == "steps" and self.step % cfg.save_steps == 0) or (
                cfg.save_strategy == "epoch" and out["ended_epoch"]):
            self.save_checkpoint()


# ---------------------------------------------------------------- the whole run


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant checkpointing: works when no input of a checkpointed block requires grad (frozen embeddings)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"gradient_checkpointing: {type(model).__name__} does not support it")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def pick_precision(device: torch.device, cfg: TrainConfig) -> torch.dtype | None:
    """The autocast dtype; an unsupported request is reported and falls back to fp32."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dtype = autocast_dtype(device, cfg.bf16, cfg.fp16)
    for w in caught:
        say(f"lorakit: warning: {w.message}")
    return dtype


def train(cfg: TrainConfig, on_step=None) -> dict:
    """Run `lorakit train` for `cfg`; returns the results written to train_results.json.

    Raises TrainError / DataError / ModelError / CheckpointError (one-line messages) before anything is written.
    `on_step(trainer)` is called after every optimizer step (tests use it). Under torchrun every rank calls this
    (distributed.py); a rank that loses the others raises DistributedError (one line) and writes nothing more.
    """
    with joined(cfg.device, cfg.ddp_backend, cfg.ddp_timeout) as (world, device):
        return train_ranks(cfg, world, device, on_step)


def train_ranks(cfg: TrainConfig, world: World, device: torch.device | None, on_step=None) -> dict:
    """`train` on this rank of `world` (the single world: one process), on `device` (None: pick as usual)."""
    plan = preflight(cfg)
    sharding = plan_for(cfg)  # DDP or FSDP2; reads fsdp / deepspeed (and refuses what it cannot do) in any case
    world.barrier()  # every rank has checked output_dir before rank 0 writes into it
    device = device or pick_device(cfg.device)
    amp_dtype = pick_precision(device, cfg)
    from ..estimate import train_summary  # here, not at the top: lorakit.estimate imports lorakit.train

    for line in train_summary(cfg, plan.records, device) if world.is_main else []:  # before the model loads
        say(f"lorakit train: {line}")
    if world.is_main:
        say(f"lorakit train: loading {plan.model_path} ...")
    # a QLoRA base is quantized layer by layer while it loads: its 16/32-bit weights never all exist at once;
    # under FSDP2 on an accelerator it loads on the CPU and fully_shard moves it over layer by layer
    load_on = load_device(sharding, world, device)
    if load_on != device and world.is_main:
        say(f"lorakit train: FSDP2: the base loads on the CPU; fully_shard moves each decoder layer to {device} "
            f"as it shards it")
    model, tokenizer, _ = load_model(cfg.model_name_or_path, dtype="float32", device=load_on,
                                     quantization=quantization_of(cfg))
    task = task_data(cfg, plan.records, tokenizer)
    rows = replay_count(len(task.train), cfg.replay_ratio) if plan.replay else None  # self-replay answers no more
    replay = build_replay(cfg, plan.replay, model, tokenizer, plan.model_path, amp_dtype, rows)  # before any LoRA
    data = prepare_data(cfg, plan.records, tokenizer, replay, task)
    seed_everything(cfg.seed)
    factors = None
    if cfg.loraga_init:  # LoRA-GA starts from the gradient of the plain model
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        factors = estimate_lora_ga(model, lora_config_for(cfg, None), cfg, data.items, pad_id, device, amp_dtype,
                                   packed=data.packed, say=say)
    trainable = make_trainable(model, cfg, lora_ga_factors=factors)
    if world.distributed:  # the same initial weights on every rank, then dropout masks of each rank's own
        seed_everything(cfg.seed + world.rank)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.config.use_cache = False
    model.train()
    trainer = Trainer(cfg, trainable, tokenizer, data, device, amp_dtype, world)
    reason = check_chunked_route(model, trainer.collate(trainer.epoch_order(0)[0])[0])
    trainer.chunked = reason is None
    if trainer.distill is not None:  # before any output is written; the loss would refuse it at the first step
        problem = distill_problem(model) or (f"replay_kl_weight needs the chunked loss ({reason})" if reason else None)
        if problem:
            raise ValueError(problem)
    apply_model_levers(model, amp_dtype, packed=data.packed, lora=trainable.lora is not None)  # after the fp32 check
    trainer.keep_teacher_states()  # after the levers: the base as every step will run it
    trainer.keep_null_space()  # the same: the inputs every step's layers will see
    if world.distributed:  # after the levers: FSDP2 shards the frozen base in the dtype they leave it in
        trainer.distribute(sharding)
    if plan.resume:
        trainer.resume(plan.resume)
    out, log = Path(cfg.output_dir), None
    if world.is_main:
        if cfg.overwrite_output_dir and not plan.resume:
            clear_previous_run(out)
        out.mkdir(parents=True, exist_ok=True)
        write_file(out / TRAINING_ARGS, cfg.to_yaml())
        log = MetricsLog(out, resume_step=trainer.step if plan.resume else None)
        for line in startup_lines(trainer, model, reason, plan.resume):
            say(line)
    status = trainer.run(log, on_step)
    if status == "interrupted":
        return {"status": "interrupted", "global_step": trainer.step}
    return finish(trainer, out)


def finish(trainer: Trainer, out: Path) -> dict:
    """Final adapter (or model) + tokenizer + results + plots into output_dir (rank 0; FSDP2's weights are
    gathered to it first, every rank taking part)."""
    weights = ckpt.gathered_weights(trainer.trainable) if trainer.fsdp else None
    if not trainer.world.is_main:
        return {"status": "completed", "global_step": trainer.step}
    ckpt.save_weights(trainer.trainable, out, weights)
    trainer.tokenizer.save_pretrained(out)
    seconds = max(trainer.run_seconds, 1e-9)
    results = {"status": "completed", "global_step": trainer.step, "epoch": round(trainer.epoch_float, 4),
               "train_loss": (sum(trainer.run_losses) / len(trainer.run_losses)) if trainer.run_losses else None,
               "train_runtime": round(trainer.run_seconds, 3),
               "train_steps_per_second": round(len(trainer.run_losses) / seconds, 4),
               "train_tokens_per_second": round(trainer.run_tokens / seconds, 1)}
    results.update({k: v for k, v in trainer.state.last_metrics.items() if k.startswith("eval_")})
    write_file(out / RESULTS_FILE, json.dumps(results, indent=2) + "\n")
    plots = plot_loss(out) if trainer.cfg.plot_loss else []
    if trainer.ranks is not None:
        plots.append(trainer.ranks.report(out, say=say))
        results["adalora_ranks"] = trainer.ranks.ranks()
    what = "adapter" if trainer.trainable.lora is not None else "model"
    loss = f", train loss {results['train_loss']:.4f}" if results["train_loss"] is not None else ""
    plotted = f"; plots: {', '.join(p.name for p in plots)}" if plots else ""
    say(f"saved {what} to {out} ({trainer.step} steps{loss}, {results['train_tokens_per_second']:.0f} tokens/s)"
        f"{plotted}")
    return results
