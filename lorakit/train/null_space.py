"""Keeping LoRA's update off the inputs general text produces: `replay_null_space: e` (a share of energy).

A LoRA layer changes its output by s B A x, linearly in its input x. For every LoRA linear layer, from the base
model's inputs on the run's replay rows (adapters off, the run's autocast, every non-padding token):

    C = sum_x x x^T                                              (in, in), float64 while summing
    U = the top eigenvectors of C holding a share e of trace(C)  (in, k)
    V = the other eigenvectors                                   (in, in - k): I - U U^T = V V^T

and A <- A V V^T before the first step and after every optimizer step (projected AdamW), so s B A x = 0 for every
x in span(U): on inputs like the replay rows' the layer computes what the base did, whatever B learns, and only
what lies outside them (the task's own directions) moves the output. The null-space idea of knowledge editing
(an edit constrained to leave the keys of preserved knowledge alone), on LoRA's down-projection. The projected A is
an ordinary A: the saved adapter is plain PEFT LoRA.

Layers that read the same input tensor (q, k and v; gate and up) share one C and one V. What is kept while
measuring (every C at once, `in^2` float64 each) is checked against MAX_BYTES before the forward runs; V is kept
for the run. Refused where the projection would not mean "the base's output on those inputs": DoRA (its magnitude
rescales every input), AdaLoRA, and the inits that start with B != 0 (PiSSA, LoRA-GA); and for packed rows (the
inputs are measured per example) and FSDP2 (A is sharded).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn

from ..data.batching import pad_collate
from ..lora.inject import lora_layers

MAX_BYTES = 4 << 30  # the input covariances of one run, summed while measuring (float64), at most this
BATCH_ROWS = 16  # replay examples per no-grad forward while measuring


@dataclass
class NullSpace:
    """Per LoRA layer, its A weight (r, in) and the directions V (in, in - k) it keeps; `removed` the share of all
    input directions taken out."""

    keep: list[tuple[torch.Tensor, torch.Tensor]]
    removed: float

    @torch.no_grad()
    def project(self) -> None:
        """A <- A V V^T for every layer."""
        for a, v in self.keep:  # a (r, in), v (in, in - k)
            a.copy_((a @ v) @ v.T)


def planned_bytes(layers: list) -> int:
    """What the float64 covariances would take while measuring (an upper bound: one per layer, shared or not)."""
    return sum(m.in_features ** 2 * 8 for _, m in layers)


def measure(model: nn.Module, items: list[dict], base: Callable[[], AbstractContextManager],
            autocast: Callable[[], AbstractContextManager], device: torch.device, pad_id: int,
            energy: float) -> NullSpace:
    """The null space of every LoRA linear layer's inputs on the replay items (`"replay": True`) of `items`
    (ValueError, one line, before any forward: an embedding LoRA layer, covariances above MAX_BYTES)."""
    if not 0 < energy < 1:
        raise ValueError(f"replay_null_space must be in (0, 1), got {energy}")
    layers = lora_layers(model)
    embedding = next((k for k, m in layers if not hasattr(m, "in_features")), None)
    if embedding is not None:  # its input is a token id, not a vector: nothing to keep A out of
        raise ValueError(f"replay_null_space projects LoRA on linear layers only; {embedding} is an embedding "
                         "(take it out of lora_target)")
    planned = planned_bytes(layers)
    if planned > MAX_BYTES:
        raise ValueError(f"replay_null_space would sum {planned / 2**30:.1f} GB of input covariances (float64, one "
                         f"per LoRA layer) while measuring, above its {MAX_BYTES / 2**30:.1f} GB; target fewer or "
                         "narrower layers (lora_target)")
    rows = [it for it in items if it.get("replay") is True]
    if not rows:
        raise ValueError("replay_null_space needs replay rows (replay_ratio above 0, examples not packed)")
    sums, owner = covariances(model, layers, rows, base, autocast, device, pad_id)
    keep, removed, total, directions = [], 0, 0, {}
    for key, m in layers:
        shared = owner[key]
        if shared not in directions:
            directions[shared] = kept_directions(sums.pop(shared), energy)
        a = m.lora_A[m.active_adapter].weight
        v = directions[shared].to(device=a.device, dtype=a.dtype)  # (in, in - k)
        keep.append((a, v))
        removed, total = removed + m.in_features - v.shape[1], total + m.in_features
    return NullSpace(keep, removed / max(total, 1))


def covariances(model: nn.Module, layers: list, rows: list[dict], base, autocast, device: torch.device,
                pad_id: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """({first layer of each distinct input: sum x x^T (in, in) float64}, {layer: that first layer}): layers whose
    forward received the same tensor in the first batch share one sum."""
    sums: dict[str, torch.Tensor] = {}
    owner: dict[str, str] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), base(), autocast():
            for start in range(0, len(rows), BATCH_ROWS):
                batch = pad_collate(rows[start:start + BATCH_ROWS], pad_id)  # right-padded (b, width)
                mask = batch["attention_mask"].bool()
                seen = layer_inputs(model, layers, batch["input_ids"].to(device), batch["attention_mask"].to(device))
                if not owner:
                    first: dict[int, str] = {}
                    for key, _ in layers:  # the same tensor object within this one forward (all still held)
                        owner[key] = first.setdefault(id(seen[key]), key)
                for key in {owner[k] for k, _ in layers}:
                    x = seen[key][mask.to(seen[key].device)].float()  # (N, in)
                    part = (x.T @ x).double().cpu()  # one batch in float32, the running sum in float64
                    sums[key] = sums[key] + part if key in sums else part
    finally:
        model.train(was_training)
    return sums, owner


def layer_inputs(model: nn.Module, layers: list, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each LoRA layer's input (B, T, in) in one forward; the hooks are removed before returning."""
    seen: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda mod, inp, out, key=key: seen.__setitem__(key, inp[0]))
               for key, m in layers]
    try:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen


def kept_directions(c: torch.Tensor, energy: float) -> torch.Tensor:
    """The eigenvectors V (in, in - k) of the symmetric `c` outside its top k, the fewest whose eigenvalues sum to a
    share `energy` of the trace; float32 (the decomposition too: the cut needs the top of the spectrum, which
    float32 resolves to 1e-7 of the largest eigenvalue, faster than float64)."""
    values, vectors = torch.linalg.eigh(c.float())  # ascending
    values = values.double().flip(0).clamp_min(0)
    k = int((torch.cumsum(values, 0) / values.sum().clamp_min(1e-300) < energy).sum()) + 1
    return vectors.flip(1)[:, k:].contiguous()
