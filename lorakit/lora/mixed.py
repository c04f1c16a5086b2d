"""Mixed-batch inference: each batch row runs through its own adapter (or none), in one pass.

The adapters present in a batch are stacked once per layer, ranks zero-padded to the largest, scaling folded
into B, plus an all-zero slot for rows that want the base model:

    A_stack (N+1, R, in),  B_stack (N+1, out, R)
    prompt (T > 1):  delta[b] = x[b] @ A_stack[slot[b]]^T @ B_stack[slot[b]]^T     two batched matmuls
    one token:       delta = ((x @ A_cat^T) * mask) @ B_cat^T                       A_cat (N*R, in), mask (B, N*R)

Decoding steps take the second form: every adapter's A in one matmul, a 0/1 mask keeping each row's own block of
rank columns, one matmul with every B, added into the base output in place; at one token per row that is cheaper
than gathering per-row weights (N times the rank flops, which are tiny next to the base weights).
Zero-padding is exact: the padded rank directions contribute 0 * x. The stacks are cached per layer, checked once
per mixed call (Routing) and rebuilt when the set of adapters or any of their weights changes (version counters).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

BASE = "__base__"


@dataclass(frozen=True)
class Routing:
    """Which adapter each batch row uses: `slot[b]` indexes `names`; len(names) means the base model."""

    names: tuple[str, ...]
    slot: torch.Tensor  # (B,) long
    masks: dict = field(default_factory=dict, compare=False, repr=False)  # (rows, R, dtype) -> (rows, N*R)

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

    def block_mask(self, batch: int, rank: int, like: torch.Tensor) -> torch.Tensor:
        """(batch, N*rank) 0/1: row b keeps the rank columns of its own adapter (none for the base model)."""
        key = (batch, rank, like.dtype)
        mask = self.masks.get(key)
        if mask is None:
            owner = torch.arange(len(self.names) * rank, device=like.device) // rank  # adapter of each column
            mask = self.masks[key] = (owner[None] == self.rows_for(batch)[:, None].to(like.device)).to(like.dtype)
        return mask


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


@dataclass(frozen=True)
class Stacks:
    a: torch.Tensor  # (N+1, R, in); slot N is the base model's zeros
    b: torch.Tensor  # (N+1, out, R), scaling folded in
    b_cat: torch.Tensor  # (N*R, out): every adapter's B^T, blocks in slot order

    @property
    def a_cat(self) -> torch.Tensor:
        return self.a[:-1].reshape(-1, self.a.shape[-1])  # (N*R, in), a view


def _stacks(layer: nn.Module, routing: Routing, tables: tuple[str, str]) -> Stacks | None:
    """The layer's stacks for this batch's adapters, zeros where an adapter is absent; None when no adapter of the
    batch lives in this layer. Checked against the weights once per mixed call, then reused at every step."""
    cached = getattr(layer, "_mixed_cache", None)
    if cached is not None and cached[0] is routing:
        return cached[2]
    names = routing.names
    key = _stack_key(layer, names, tables)
    if cached is not None and cached[1] == key:
        layer._mixed_cache = (routing, key, cached[2])
        return cached[2]
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
            b_cat = b_stack[:-1].transpose(1, 2).reshape(-1, b_stack.shape[1])  # (N*R, out), a copy
        stacks = Stacks(a_stack, b_stack, b_cat)
    layer._mixed_cache = (routing, key, stacks)
    return stacks


def _weight(entry: nn.Module | torch.Tensor) -> torch.Tensor:
    return entry.weight if isinstance(entry, nn.Module) else entry


def add_linear_delta(layer: nn.Module, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """result + per-row scaling * B A x for a LoraLinear; in place when no gradient is wanted."""
    routing = layer.routing
    stacks = _stacks(layer, routing, ("lora_A", "lora_B"))
    if stacks is None:
        return result
    batch = x.shape[0]
    x3 = x.reshape(batch, -1, x.shape[-1]).to(stacks.a.dtype)  # (B, T, in)
    if x3.shape[1] == 1:  # one token per row (decoding): all adapters' A at once, masked to each row's own
        h = F.linear(x3.reshape(batch, -1), stacks.a_cat)  # (B, N*R)
        h = h * routing.block_mask(batch, stacks.a.shape[1], h)
        if not torch.is_grad_enabled() and result.dtype == h.dtype and result.is_contiguous():
            return result.view(batch, -1).addmm_(h, stacks.b_cat).view(result.shape)
        return result + (h @ stacks.b_cat).to(result.dtype).view(result.shape)
    slot = routing.rows_for(batch)
    h = torch.bmm(x3, stacks.a[slot].transpose(1, 2))  # (B, T, R)
    y = torch.bmm(h, stacks.b[slot].transpose(1, 2))  # (B, T, out)
    return result + y.reshape(result.shape).to(result.dtype)


def embedding_delta(layer: nn.Module, ids: torch.Tensor) -> torch.Tensor | None:
    """Per-row scaling * (A^T[ids]) B^T for a LoraEmbedding; A is (r, vocab), so A^T[ids] is a row lookup."""
    routing = layer.routing
    stacks = _stacks(layer, routing, ("lora_embedding_A", "lora_embedding_B"))
    if stacks is None:
        return None
    a_stack, b_stack = stacks.a, stacks.b
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
