"""The trainer's state as of its last completed optimizer step: one object, saved and loaded as one JSON file.

    TrainerState
        step                 optimizer steps completed
        epoch, batch_in_epoch   where the next step starts: its epoch, and its first micro-batch in that epoch's order
        examples_consumed    training items (examples, or packed rows) the completed steps used, over all ranks
        schedule             what the run was started with (Schedule): a resume must keep it
        rng                  python / numpy / torch CPU / CUDA generator states at the step boundary (this rank's)
        rng_by_rank          with several ranks: every rank's `rng`, in rank order (saved by rank 0)
        last_metrics         the latest logged metrics

The data order is a pure function of (seed, epoch), so (epoch, batch_in_epoch) and the RNG states, taken before
the next step's first micro-batch, are all a resumed run needs to draw the same batches and dropout masks as an
uninterrupted one. A distributed run adds its world size to Schedule and counts examples over all ranks; its
data position counts global micro-batches (per device x world size), so a run resumes at another world size with
the same global micro-batch on the same data order.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..files import write_file

STATE_FILE = "trainer_state.json"
STATE_FORMAT = 2  # 1: the step/epoch JSON beside scheduler.pt and rng_state.pth of lorakit before issue 12


class CheckpointError(ValueError):
    """A checkpoint that cannot be found, cannot be read or does not fit the run; one line."""


@dataclass(frozen=True)
class Schedule:
    """The settings that fix which batches each step sees and its learning rate; a resume must keep every one."""

    total_steps: int
    warmup_steps: int
    lr_scheduler_type: str
    learning_rate: float
    max_steps: int
    num_train_epochs: float
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    batches_per_epoch: int
    seed: int
    world_size: int = 1

    def mismatch(self, now: Schedule) -> tuple[str, str, str] | None:
        """(key, as saved, as now) of the first setting that differs, in the user's terms; None when all match."""
        for key in ("max_steps", "num_train_epochs", "warmup_steps", "lr_scheduler_type", "learning_rate",
                    "per_device_train_batch_size", "gradient_accumulation_steps", "seed", "batches_per_epoch",
                    "total_steps"):
            if key == "num_train_epochs" and self.max_steps > 0 and now.max_steps > 0:
                continue  # max_steps decides; the epoch count is not used
            if key == "per_device_train_batch_size" and self.world_size != now.world_size:
                # another world size: the global micro-batch (per device x ranks) fixes the batches, and must stay
                saved, mine = self.global_micro_batch, now.global_micro_batch
                if saved != mine:
                    return ("per_device_train_batch_size x world size (the global micro-batch)",
                            f"{self.per_device_train_batch_size}x{self.world_size}",
                            f"{now.per_device_train_batch_size}x{now.world_size}")
                continue
            saved, mine = getattr(self, key), getattr(now, key)
            if saved != mine:
                if key == "warmup_steps":
                    return "warmup (warmup_steps, warmup_ratio)", f"{saved} steps", f"{mine} steps"
                if key == "batches_per_epoch":
                    return ("batches per epoch (dataset, max_samples, cutoff_len, packing or val_size changed)",
                            str(saved), str(mine))
                return key, _shown(key, saved), _shown(key, mine)
        return None

    @property
    def global_micro_batch(self) -> int:
        """Items of one micro-batch over all ranks: the epoch's order is cut into these, then split by rank."""
        return self.per_device_train_batch_size * self.world_size


def _shown(key: str, value) -> str:
    if key == "max_steps" and value <= 0:
        return f"{value} (num_train_epochs decides)"
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass
class TrainerState:
    """Where a run stands after `step` completed optimizer steps (see the module docstring)."""

    schedule: Schedule
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    examples_consumed: int = 0
    rng: dict = field(default_factory=dict)
    last_metrics: dict = field(default_factory=dict)
    rng_by_rank: list[dict] = field(default_factory=list)

    def epoch_float(self) -> float:
        return self.epoch + self.batch_in_epoch / max(self.schedule.batches_per_epoch, 1)

    def save(self, directory: Path) -> Path:
        """directory/trainer_state.json (written atomically)."""
        data = {"format": STATE_FORMAT, "global_step": self.step, "epoch": round(self.epoch_float(), 6),
                "epoch_index": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "examples_consumed": self.examples_consumed, "schedule": dataclasses.asdict(self.schedule),
                "last_metrics": self.last_metrics, "rng": self.rng}
        if self.rng_by_rank:
            data["rng_by_rank"] = self.rng_by_rank
        return write_file(Path(directory) / STATE_FILE, json.dumps(data, indent=1) + "\n")

    @classmethod
    def load(cls, directory: Path) -> TrainerState:
        """The state `save` wrote into `directory`; CheckpointError naming the file when it is not one."""
        path = Path(directory) / STATE_FILE
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: cannot read the trainer state ({exc})") from None
        if data.get("format") != STATE_FORMAT:
            raise CheckpointError(f"{path}: made by an older lorakit (no trainer state format {STATE_FORMAT}); "
                              f"it cannot be resumed exactly: start the run again")
        try:
            return cls(schedule=Schedule(**data["schedule"]), step=data["global_step"], epoch=data["epoch_index"],
                       batch_in_epoch=data["batch_in_epoch"], examples_consumed=data["examples_consumed"],
                       rng=data["rng"], last_metrics=data.get("last_metrics", {}),
                       rng_by_rank=data.get("rng_by_rank", []))
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"{path}: the trainer state lacks or misnames a field ({exc})") from None

    def restore_rng(self, rank: int = 0, world_size: int = 1) -> bool:
        """Put every random number generator back where it stood at the step boundary this state was taken at:
        each rank its own. A rank the saved run did not have (it had fewer ranks) is seeded from (seed, rank)
        instead. True when every rank found its own generators (the same world size)."""
        saved = self.rng_by_rank or [self.rng]
        if rank < len(saved):
            self.rng = saved[rank]
            restore_rng(self.rng)
        else:
            random.seed(self.schedule.seed + rank)
            np.random.seed((self.schedule.seed + rank) % 2**32)
            torch.manual_seed(self.schedule.seed + rank)
            self.rng = capture_rng()
        return len(saved) == world_size

    def check_resumable_by(self, now: Schedule, where: str) -> None:
        """CheckpointError (one line, naming the key) unless a run with schedule `now` can continue this state."""
        found = self.schedule.mismatch(now)
        if found:
            key, saved, mine = found
            raise CheckpointError(f"resume: {where} was made with {key}={saved}, this run has {mine}; a resumed run "
                              f"keeps the schedule it started with (steps, warmup, scheduler, learning rate, batch "
                              f"sizes, seed, data): set it back, or start a new run in another output_dir")


# ---------------------------------------------------------------- random number generators, as JSON


def capture_rng() -> dict:
    """The python, numpy, torch CPU and CUDA generator states, as JSON-ready values."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(words), gauss],
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "torch": _b64(torch.get_rng_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict) -> None:
    """Set every generator `capture_rng` captured back to that state."""
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)
