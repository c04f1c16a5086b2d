"""The base model's hidden states on the replay rows, computed once for the KL term instead of at every step.

`replay_kl_weight` needs, for every replay token, the base's next-token distribution softmax(h_base W^T), where
h_base is the last hidden state of the model with its adapters off (loss.py). The replay rows are drawn once and come
back every epoch unchanged, and the base is frozen, so h_base of a row is the same at every epoch: recomputing it
costs one no-grad forward of every replay row per epoch. `TeacherStates` runs that forward once, before the first
step, and keeps each replay example's states

    states[i] = h_base(example i)          (T_i, H), in the autocast dtype (the head's matmul casts to it anyway)

on the CPU; a micro-batch takes them as a batch key (`loss.TEACHER_KEY`, (B, T, H), zeros on rows and positions
that are not replay), and the loss reads the replay positions from it. Only the head (W) is applied to them at every
step, as before. The states come from the same base under the same autocast as the per-step forward would use, so
the loss is the same up to the rounding of differently shaped matmuls.

Kept only when it is small (`MAX_BYTES` in all) and the rows are not packed; otherwise the loss runs the base's
forward at every step as before (the start-up line says which).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn

from ..data.batching import pad_collate

MAX_BYTES = 512 << 20  # states kept only below this (on the CPU)
BATCH_ROWS = 16  # replay examples per no-grad forward while computing them


@dataclass
class TeacherStates:
    """Per replay example (its index in the training items) the base's last hidden states (T_i, H)."""

    states: dict[int, torch.Tensor]
    hidden_size: int
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.states.values())

    def batch(self, indices: list[int], width: int) -> torch.Tensor | None:
        """(B, width, H) for the items `indices` of a micro-batch, or None when none of them is a replay row."""
        if not any(i in self.states for i in indices):
            return None
        out = torch.zeros((len(indices), width, self.hidden_size), dtype=self.dtype)
        for row, i in enumerate(indices):
            if i in self.states:
                s = self.states[i]
                out[row, :s.shape[0]] = s
        return out


def hidden_size_of(model: nn.Module) -> int:
    """The width H of the model's last hidden state (a multimodal config keeps it in text_config)."""
    config = model.config
    return getattr(config, "hidden_size", None) or getattr(getattr(config, "text_config", None), "hidden_size", 0)


def planned_bytes(items: list[dict], hidden_size: int, dtype: torch.dtype) -> int:
    """What the states of the replay items would take."""
    size = torch.empty((), dtype=dtype).element_size()
    return sum(len(it["input_ids"]) for it in items if it.get("replay") is True) * hidden_size * size


def compute_states(model: nn.Module, items: list[dict], base: Callable[[], AbstractContextManager],
                   autocast: Callable[[], AbstractContextManager], device: torch.device, pad_id: int,
                   store_dtype: torch.dtype | None = None) -> TeacherStates:
    """The base's last hidden states on every replay example of `items` (`base()`: a context in which the model
    runs without its adapters; `autocast()`: the run's autocast), in batches of similar length, no dropout.

    `store_dtype`: the run's autocast dtype, which the head's matmul casts the states to anyway (the same numbers in
    half the memory); None keeps the dtype the forward produced."""
    replay = sorted((i for i, it in enumerate(items) if it.get("replay") is True),
                    key=lambda i: len(items[i]["input_ids"]))
    states: dict[int, torch.Tensor] = {}
    hidden_size, dtype = hidden_size_of(model), torch.float32
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), base(), autocast():
            for start in range(0, len(replay), BATCH_ROWS):
                chunk = replay[start:start + BATCH_ROWS]
                batch = pad_collate([items[i] for i in chunk], pad_id)  # right-padded (b, width)
                hidden = model.base_model(input_ids=batch["input_ids"].to(device),
                                          attention_mask=batch["attention_mask"].to(device),
                                          use_cache=False).last_hidden_state  # (b, width, H)
                hidden_size, dtype = hidden.shape[-1], store_dtype or hidden.dtype
                for row, i in enumerate(chunk):
                    states[i] = hidden[row, :len(items[i]["input_ids"])].to(dtype).cpu()  # (T_i, H)
    finally:
        model.train(was_training)
    return TeacherStates(states, hidden_size, dtype)
