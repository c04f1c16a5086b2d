"""Keeping LoRA's update off the inputs general text produces: `replay_null_space: e` (a share of energy) and
`replay_task_directions: k` (a count of directions).

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

`replay_task_directions: k` keeps A inside directions instead of out of them: the base also runs over the task
rows (C_task the same sum over them), and V = Q (in, k), an orthonormal basis of the top k generalized
eigenvectors of C_task w = lambda C_replay w (`task_directions`): where the task's input energy is largest relative
to the replay rows'. The first projection scales A's rows back to their norms.

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
BATCH_ROWS = 16  # examples per no-grad forward while measuring
RIDGE = 1e-3  # replay_task_directions: C_replay's eigenvalues floored at RIDGE / in of its trace


@dataclass
class NullSpace:
    """Per LoRA layer, its A weight (r, in) and the orthonormal directions V (in, m) it keeps (A <- A V V^T);
    `removed` the share of all input directions taken out."""

    keep: list[tuple[torch.Tensor, torch.Tensor]]
    removed: float

    @torch.no_grad()
    def project(self, keep_norm: bool = False) -> None:
        """A <- A V V^T for every layer; with `keep_norm`, each row of A is then scaled back to its norm before
        (for the start: a random row keeps about sqrt(m / in) of its norm, and B's first steps would see that)."""
        for a, v in self.keep:  # a (r, in), v (in, m)
            before = a.norm(dim=1, keepdim=True) if keep_norm else None  # (r, 1)
            a.copy_((a @ v) @ v.T)
            if before is not None:
                a.mul_(before / a.norm(dim=1, keepdim=True).clamp_min(1e-12))


def planned_bytes(layers: list, sets: int = 1) -> int:
    """What the float64 covariances would take while measuring (an upper bound: one per layer and set of rows,
    shared or not)."""
    return sets * sum(m.in_features ** 2 * 8 for _, m in layers)


def measure(model: nn.Module, items: list[dict], base: Callable[[], AbstractContextManager],
            autocast: Callable[[], AbstractContextManager], device: torch.device, pad_id: int,
            energy: float = 0.0, directions: int = 0) -> NullSpace:
    """The directions every LoRA linear layer's A keeps, from its inputs on the replay items (`"replay": True`) of
    `items`: outside the top `energy` share of their energy (replay_null_space), or, with `directions` = k, the k
    where the other (task) items' energy is largest relative to theirs (replay_task_directions). ValueError, one
    line, before any forward: an embedding LoRA layer, k not below a layer's input width, covariances above
    MAX_BYTES."""
    key = "replay_task_directions" if directions else "replay_null_space"
    if bool(energy) == bool(directions):
        raise ValueError("give one of replay_null_space (a share of energy) and replay_task_directions (a count)")
    if directions < 0 or not 0 <= energy < 1:
        raise ValueError(f"replay_null_space must be in (0, 1) and replay_task_directions >= 1, got {energy}, "
                         f"{directions}")
    layers = lora_layers(model)
    embedding = next((k for k, m in layers if not hasattr(m, "in_features")), None)
    if embedding is not None:  # its input is a token id, not a vector: nothing to keep A out of
        raise ValueError(f"{key} projects LoRA on linear layers only; {embedding} is an embedding "
                         "(take it out of lora_target)")
    narrow = next(((k, m.in_features) for k, m in layers if directions >= m.in_features), None)
    if narrow is not None:
        raise ValueError(f"replay_task_directions {directions} must be below the input width of every LoRA layer; "
                         f"{narrow[0]} reads {narrow[1]}")
    planned = planned_bytes(layers, 2 if directions else 1)
    if planned > MAX_BYTES:
        raise ValueError(f"{key} would sum {planned / 2**30:.1f} GB of input covariances (float64, one per LoRA "
                         f"layer{' and set of rows' if directions else ''}) while measuring, above its "
                         f"{MAX_BYTES / 2**30:.1f} GB; target fewer or narrower layers (lora_target)")
    rows = [it for it in items if it.get("replay") is True]
    task = [it for it in items if it.get("replay") is not True]
    if not rows or (directions and not task):
        raise ValueError(f"{key} needs replay rows and task rows (replay_ratio above 0, examples not packed)")
    sums, owner = covariances(model, layers, rows, base, autocast, device, pad_id)
    task_sums = covariances(model, layers, task, base, autocast, device, pad_id)[0] if directions else {}
    keep, removed, total, kept = [], 0, 0, {}
    for name, m in layers:
        shared = owner[name]
        if shared not in kept:
            kept[shared] = task_directions(task_sums.pop(shared), sums.pop(shared), directions) if directions \
                else kept_directions(sums.pop(shared), energy)
        a = m.lora_A[m.active_adapter].weight
        v = kept[shared].to(device=a.device, dtype=a.dtype)  # (in, m)
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


def task_directions(task: torch.Tensor, replay: torch.Tensor, k: int, ridge: float = RIDGE) -> torch.Tensor:
    """An orthonormal basis Q (in, k) of the top k generalized eigenvectors w of

        C_t w = lambda C_r w,   C_t = task / tr(task),  C_r = replay / tr(replay), its eigenvalues >= ridge / in

    the directions where the task's input energy is largest relative to the replay rows' (the floor keeps
    directions neither set reaches from counting as infinitely the task's, and absorbs the rounding of the sums).
    With C_r = E diag(l) E^T and the whitening S = E diag(l)^-1/2: M = S^T C_t S is symmetric, its top eigenvectors
    y give w = S y. Float32 (the floor is far above its rounding)."""
    n = task.shape[0]
    c_t = (task / torch.trace(task).clamp_min(1e-300)).float()
    c_r = (replay / torch.trace(replay).clamp_min(1e-300)).float()
    values, vectors = torch.linalg.eigh(c_r)  # ascending
    whiten = vectors / values.clamp_min(ridge / n).sqrt()  # (in, in): S
    m = whiten.T @ c_t @ whiten
    _, y = torch.linalg.eigh((m + m.T) / 2)  # ascending
    q, _ = torch.linalg.qr(whiten @ y[:, -k:])  # (in, k)
    return q.contiguous()
