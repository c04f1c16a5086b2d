"""Mixed-batch inference: each batch row runs through its own adapter (or none), in one pass.

The adapters present in a batch are stacked once per layer, ranks zero-padded to the largest, scaling folded
into B, plus an all-zero slot for rows that want the base model:

    A_stack (N+1, R, in),  B_stack (N+1, out, R)
    delta[b] = x[b] @ A_stack[slot[b]]^T @ B_stack[slot[b]]^T          two batched matmuls, no per-adapter loop

Zero-padding is exact: the padded rank directions contribute 0 * x. The stacks are cached per layer and rebuilt
when the set of adapters or any of their weights changes (tensor version counters).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

BASE = "__base__"


@dataclass(frozen=True)
class Routing:
    """Which adapter each batch row uses: `slot[b]` indexes `names`; len(names) means the base model."""

    names: tuple[str, ...]
    slot: torch.Tensor  # (B,) long

    @classmethod
    def from_adapter_names(cls, adapter_names: list[str], known: set[str], device: torch.device) -> "Routing":
        unknown = sorted({n for n in adapter_names if n != BASE and n not in known})
        if unknown:
            raise ValueError(f"adapter_names: unknown adapter(s) {', '.join(unknown)}; "
                             f"loaded: {', '.join(sorted(known)) or 'none'} (use '{BASE}' for the base model)")
        names = tuple(dict.fromkeys(n for n in adapter_names if n != BASE))
        slots = [names.index(n) if n != BASE else len(names) for n in adapter_names]
        return cls(names, torch.tensor(slots, dtype=torch.long, device=device))

    def rows_for(self, batch: int) -> torch.Tensor:
        """Slots for a batch of `batch` rows (beam search or sampling repeats each row k times)."""
        n = self.slot.shape[0]
        if batch == n:
            return self.slot
        if batch % n == 0:
            return self.slot.repeat_interleave(batch // n)
        raise ValueError(f"adapter_names has {n} entries but the batch has {batch} rows")


def _stack_key(layer: nn.Module, names: tuple[str, ...], tables: tuple[str, str]) -> tuple:
    versions = []
    for table in tables:
        params = getattr(layer, table)
        for name in names:
            if name in params:
                p = params[name]
                p = p.weight if isinstance(p, nn.Module) else p
                versions.append((name, p.data_ptr(), p._version))
    return names, tuple(versions)


def _stacks(layer: nn.Module, names: tuple[str, ...], tables: tuple[str, str]) -> tuple[torch.Tensor, ...] | None:
    """(A_stack (N+1, R, in), B_stack (N+1, out, R)), scaling folded into B, zeros where an adapter is absent;
    None when no adapter of the batch lives in this layer."""
    key = _stack_key(layer, names, tables)
    cached = getattr(layer, "_mixed_cache", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    a_table, b_table = (getattr(layer, t) for t in tables)
    if any(n in layer.lora_magnitude_vector for n in names):
        raise ValueError("mixed-batch inference does not support DoRA adapters; merge them or use set_adapter()")
    present = [n for n in names if n in a_table]
    stacks = None
    if present:
        ref_a, ref_b = _weight(a_table[present[0]]), _weight(b_table[present[0]])
        rank = max(layer.r[n] for n in present)
        a_stack = ref_a.new_zeros(len(names) + 1, rank, ref_a.shape[1])
        b_stack = ref_b.new_zeros(len(names) + 1, ref_b.shape[0], rank)
        with torch.no_grad():
            for i, name in enumerate(names):
                if name in a_table:
                    r = layer.r[name]
                    a_stack[i, :r] = _weight(a_table[name])
                    b_stack[i, :, :r] = _weight(b_table[name]) * layer.scaling[name]
        stacks = (a_stack, b_stack)
    layer._mixed_cache = (key, stacks)
    return stacks


def _weight(entry: nn.Module | torch.Tensor) -> torch.Tensor:
    return entry.weight if isinstance(entry, nn.Module) else entry


def linear_delta(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """Per-row scaling * B A x for a LoraLinear (None: no adapter of this batch in this layer)."""
    routing = layer.routing
    stacks = _stacks(layer, routing.names, ("lora_A", "lora_B"))
    if stacks is None:
        return None
    a_stack, b_stack = stacks
    slot = routing.rows_for(x.shape[0])
    x3 = x.reshape(x.shape[0], -1, x.shape[-1]).to(a_stack.dtype)  # (B, T, in)
    h = torch.bmm(x3, a_stack[slot].transpose(1, 2))  # (B, T, R)
    y = torch.bmm(h, b_stack[slot].transpose(1, 2))  # (B, T, out)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def embedding_delta(layer: nn.Module, ids: torch.Tensor) -> torch.Tensor | None:
    """Per-row scaling * (A^T[ids]) B^T for a LoraEmbedding; A is (r, vocab), so A^T[ids] is a row lookup."""
    routing = layer.routing
    stacks = _stacks(layer, routing.names, ("lora_embedding_A", "lora_embedding_B"))
    if stacks is None:
        return None
    a_stack, b_stack = stacks
    slot = routing.rows_for(ids.shape[0])
    ids2 = ids.reshape(ids.shape[0], -1)  # (B, T)
    h = a_stack.transpose(1, 2)[slot[:, None].expand_as(ids2), ids2]  # (B, T, R)
    y = torch.bmm(h, b_stack[slot].transpose(1, 2))  # (B, T, dim)
    return y.reshape(*ids.shape, y.shape[-1])


def modules_to_save_forward(wrapper: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Rows using an adapter with its own copy of the module run through that copy (rare: heads, embeddings)."""
    routing = wrapper.routing
    out = wrapper.original_module(x, *args, **kwargs)
    slot = routing.rows_for(x.shape[0])
    for i, name in enumerate(routing.names):
        rows = (slot == i).nonzero().flatten()
        if name in wrapper.modules_to_save and rows.numel():
            out = out.index_copy(0, rows, wrapper.modules_to_save[name](x[rows], *args, **kwargs))
    return out
