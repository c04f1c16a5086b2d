"""Mixed-batch inference: each batch row runs through its own adapter (or none), in one pass.

The adapters present in a batch are stacked once per layer, ranks zero-padded to the largest, scaling folded
into B, plus an all-zero slot for rows that want the base model:

    A_stack (N+1, R, in),  B_stack (N+1, out, R),  delta[b] = scaling B_slot[b] A_slot[b] x[b]

A batch where every row has one adapter (or none) runs grouped by adapter, so that each row multiplies only its own
adapter's A and B and no weight is gathered per row. With G adapters present and C rows in the largest group, the
rows are gathered into (G, C, T, in) (padding rows are zeros) and

    h = x_g @ A_stack[present]^T    (G, C*T, R)      delta_g = h @ B_stack[present]^T    (G, C*T, out)

then each batch row takes its group row's delta (`Groups.source`; a row of the base model takes a padding row's exact
zeros) and adds it into its base output. The flops are
those of the rows' own adapters, the weights of each adapter in use are read once per call, prompts (T > 1) and
decoding steps (T = 1) alike. Rows that want the base model are in no group. Zero-padding of ranks is exact: the
padded rank directions contribute 0 * x.

A row may also ask for a weighted combination of adapters (an entry {name: weight, ...}):

    delta[b] = sum_i w[b, i] * scaling_i * B_i A_i x[b]      = ((x @ A_cat^T) * w[b, owner]) @ B_cat^T

with A_cat (N*R, in) every adapter's A, B_cat (N*R, out) every B^T, and each rank column weighted by its row's
weight of the adapter that owns it (`Routing.block_mask`): a batch with a combination runs every row this way.
DoRA adapters (dora.py) run per row too: with g = m / ||W0 + s B A|| per output row (1 for a plain adapter and the
base), a row's output is  g[slot] * (W0 x + s B A x) + b,  which is DoRA's formula; a weighted combination that
includes a DoRA adapter, or one with modules_to_save, is refused before the call (LoraModel.check_adapter_entry):
DoRA's magnitude rescales the whole weight and a module copy replaces a whole module, so neither mixes.

How a layer learns the routing: `LoraModel.forward/generate(..., adapter_names=...)` builds one `Routing` (each
row's slot and weights, and every LoRA layer's stacks) and makes it current for the duration of that call
(`routed`); a LoRA layer's forward reads `current_routing()`. Nothing is set on the layers. The stacks hold every
per-row adapter the LoraModel has, in load order (N above is that count), and come from a `StackCache` the
LoraModel holds: checked against the adapters' weights (storage, version counters) once per call and rebuilt only when
adapters are added, removed or changed, not when a batch's mix of adapters does (a server's batches change every
step). With gradients on, the stacks are built from the parameters in the graph instead (not cached), so the LoRA
parameters get gradients; training mode is refused by LoraModel (no dropout runs on this path).
`disable_adapter()` wins over the routing: a disabled layer gives the base output for every row.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import dora

BASE = "__base__"
LINEAR_TABLES = ("lora_A", "lora_B")
EMBEDDING_TABLES = ("lora_embedding_A", "lora_embedding_B")


@dataclass(frozen=True)
class Stacks:
    a: torch.Tensor  # (N+1, R, in); slot N is the base model's zeros
    b: torch.Tensor  # (N+1, out, R), scaling folded in
    b_cat: torch.Tensor  # (N*R, out): every adapter's B^T, blocks in slot order
    dora_scale: torch.Tensor | None = None  # (N+1, out) fp32: m / ||W0 + s B A|| for DoRA adapters, 1 elsewhere

    @property
    def a_cat(self) -> torch.Tensor:
        return self.a[:-1].reshape(-1, self.a.shape[-1])  # (N*R, in), a view


@dataclass(frozen=True)
class Groups:
    """A one-adapter-per-row batch's rows gathered by adapter: group g holds the rows of adapter `present[g]`,
    padded to `size` rows. Position p = g * size + j of the flattened groups reads batch row `gather[p]` (B, one past
    the last row, is a zero row: padding); batch row b takes its delta from position `source[b]` (a padding
    position, whose delta is exactly zero, for a row that wants the base model: there is one whenever such a row
    exists). `identity`: the positions are the batch rows in order (one adapter, or rows already grouped, no base
    rows), so neither gather nor source is needed. (Gathering back with index_select rather than scattering with
    index_add_: the latter opens a parallel region even for a few rows, which costs a scheduler slice per layer
    when another process holds a core.)"""

    present: torch.Tensor  # (G,) long: indices into Routing.names, ascending
    gather: torch.Tensor  # (G * size,) long, values in [0, B]
    source: torch.Tensor  # (B,) long, values in [0, G * size)
    size: int  # C, the rows of a group
    padded: bool  # some position reads the zero row
    identity: bool

    @staticmethod
    def of(slot: list[int], n: int, device: torch.device) -> Groups | None:
        """The groups of rows whose slot is below n (slot n is the base model); None when every row is the base."""
        rows: dict[int, list[int]] = {}
        for b, s in enumerate(slot):
            if s < n:
                rows.setdefault(s, []).append(b)
        if not rows:
            return None
        present = sorted(rows)
        size = max(len(r) for r in rows.values())
        short = any(len(r) < size for r in rows.values())
        if not short and sum(len(r) for r in rows.values()) < len(slot):
            size += 1  # rows of the base model read their zeros from a padding position
        pad = len(slot)
        gather = [b for s in present for b in rows[s] + [pad] * (size - len(rows[s]))]
        zero = gather.index(pad) if pad in gather else 0
        position = {b: p for p, b in enumerate(gather) if b != pad}
        source = [position.get(b, zero) for b in range(len(slot))]
        tensors = (torch.tensor(v, dtype=torch.long, device=device) for v in (present, gather, source))
        return Groups(*tensors, size, pad in gather, gather == list(range(len(slot))))


@dataclass(frozen=True)
class Routing:
    """What each batch row asks for: `weights[b, i]` is row b's weight of adapter `names[i]` (one-hot for a row
    with one adapter, all zero for the base model); `slot[b]` indexes `names` for those one-adapter rows (len(names)
    means the base), and `single` says every row is such a row. `stacks` holds every LoRA layer's stacks for those
    adapters (None where no adapter of the batch lives in a layer)."""

    names: tuple[str, ...]
    weights: torch.Tensor  # (B, N) float32
    slot: torch.Tensor  # (B,) long; meaningful where `single`
    single: bool
    stacks: Mapping[nn.Module, Stacks | None] = field(repr=False)
    groups: Groups | None = None  # where `single`: the rows by adapter (None when every row is the base model)
    masks: dict = field(default_factory=dict, compare=False, repr=False)  # (rank, dtype) -> (B, N*R), this call

    def rows_for(self, batch: int) -> torch.Tensor:
        """The slots of a batch of `batch` rows: exactly one entry of adapter_names per row. (generate() with
        num_return_sequences or beams expands the routing itself, see `expanded`.)"""
        n = self.slot.shape[0]
        if batch != n:
            raise ValueError(f"adapter_names has {n} entries but the batch has {batch} rows; give one name per row "
                             f"(a flattened or reshaped input cannot be routed)")
        return self.slot

    def expanded(self, k: int) -> Routing:
        """Each row repeated k times in place, as generate() repeats the prompts for k sequences or beams."""
        if k == 1:
            return self
        slot = self.slot.repeat_interleave(k)
        groups = Groups.of(slot.tolist(), len(self.names), slot.device) if self.single else None
        return Routing(self.names, self.weights.repeat_interleave(k, dim=0), slot, self.single, self.stacks, groups)

    def block_mask(self, rank: int, like: torch.Tensor) -> torch.Tensor:
        """(B, N*rank): each rank column of adapter i carries the row's weight of adapter i (0/1 for one adapter)."""
        key = (rank, like.dtype)
        mask = self.masks.get(key)
        if mask is None:
            mask = self.weights.to(device=like.device, dtype=like.dtype).repeat_interleave(rank, dim=1)
            self.masks[key] = mask
        return mask


def make_routing(adapter_names: list, bank: tuple[str, ...], device: torch.device,
                 stacks: Mapping[nn.Module, Stacks | None]) -> Routing:
    """The Routing of one call over `bank`, the adapters the stacks hold (all the LoraModel's per-row adapters, in
    load order, so that the stacks change only when adapters do, not with each batch's mix)."""
    _, rows = parse_names(adapter_names, set(bank))
    weights = torch.zeros(len(rows), len(bank), dtype=torch.float32)
    for b, row in enumerate(rows):
        for name, w in row.items():
            weights[b, bank.index(name)] = w
    one = [len(row) == 1 and next(iter(row.values())) == 1.0 for row in rows]
    single = all(o or not row for o, row in zip(one, rows))
    slot = [bank.index(next(iter(row))) if o else len(bank) for o, row in zip(one, rows)]  # combinations: base slot
    groups = Groups.of(slot, len(bank), device) if single else None
    return Routing(bank, weights.to(device), torch.tensor(slot, dtype=torch.long, device=device), single, stacks,
                   groups)


def parse_names(adapter_names: list, known: set[str]) -> tuple[tuple[str, ...], list[dict[str, float]]]:
    """(distinct adapters in order of appearance, each row as {adapter: weight}); an entry is an adapter name,
    BASE, or a mapping {name: weight} (a weighted combination). One-line errors for unknown names, bad weights."""
    rows = []
    for i, entry in enumerate(adapter_names):
        if isinstance(entry, str):
            rows.append({} if entry == BASE else {entry: 1.0})
        elif isinstance(entry, Mapping) and entry:
            bad = [w for w in entry.values() if isinstance(w, bool) or not isinstance(w, (int, float))
                   or not math.isfinite(w)]
            if bad or BASE in entry:
                raise ValueError(f"adapter_names[{i}]: a combination maps adapter names to finite numbers, "
                                 f"got {dict(entry)!r}")
            rows.append({name: float(w) for name, w in entry.items() if w != 0})
        else:
            raise ValueError(f"adapter_names[{i}]: expected an adapter name or a {{name: weight}} mapping, "
                             f"got {entry!r}")
    unknown = sorted({n for row in rows for n in row if n not in known})
    if unknown:
        raise ValueError(f"adapter_names: unknown adapter(s) {', '.join(unknown)}; "
                         f"loaded: {', '.join(sorted(known)) or 'none'} (use '{BASE}' for the base model)")
    names = tuple(dict.fromkeys(n for row in rows for n in row))
    return names, rows


_current: ContextVar[Routing | None] = ContextVar("lorakit_routing", default=None)


def current_routing() -> Routing | None:
    """The routing of the LoraModel call in progress (in this thread), or None outside one."""
    return _current.get()


@contextlib.contextmanager
def routed(routing: Routing) -> Iterator[None]:
    """Make `routing` current for the block (one forward or generate call)."""
    token = _current.set(routing)
    try:
        yield
    finally:
        _current.reset(token)


# --- stacks ------------------------------------------------------------------------------------------------------
def tables_of(layer: nn.Module) -> tuple[str, str]:
    return LINEAR_TABLES if hasattr(layer, "lora_A") else EMBEDDING_TABLES


def _weight(entry: nn.Module | torch.Tensor) -> torch.Tensor:
    return entry.weight if isinstance(entry, nn.Module) else entry


def build_stacks(layer: nn.Module, names: tuple[str, ...]) -> Stacks | None:
    """The layer's stacks for `names`, zeros where an adapter is absent; None when none of them lives here.
    Differentiable with respect to the adapters' parameters when gradients are on."""
    a_table, b_table = (getattr(layer, t) for t in tables_of(layer))
    present = [n for n in names if n in a_table]
    if not present:
        return None
    rank = max(layer.r[n] for n in present)
    ref_a, ref_b = _weight(a_table[present[0]]), _weight(b_table[present[0]])
    a_rows, b_rows = [], []
    for name in names:
        if name in a_table:
            pad = rank - layer.r[name]
            a = layer.effective_a(name) if hasattr(layer, "effective_a") else _weight(a_table[name])  # AdaLoRA: E*A
            a_rows.append(F.pad(a, (0, 0, 0, pad)))  # (R, in)
            b_rows.append(F.pad(_weight(b_table[name]) * layer.scaling[name], (0, pad)))  # (out, R)
        else:
            a_rows.append(ref_a.new_zeros(rank, ref_a.shape[1]))
            b_rows.append(ref_b.new_zeros(ref_b.shape[0], rank))
    a_rows.append(ref_a.new_zeros(rank, ref_a.shape[1]))  # the base model's slot
    b_rows.append(ref_b.new_zeros(ref_b.shape[0], rank))
    a_stack, b_stack = torch.stack(a_rows), torch.stack(b_rows)  # (N+1, R, in), (N+1, out, R)
    b_cat = b_stack[:-1].transpose(1, 2).reshape(-1, b_stack.shape[1])  # (N*R, out)
    return Stacks(a_stack, b_stack, b_cat, _dora_scale(layer, names, b_stack.shape[1]))


def _dora_scale(layer: nn.Module, names: tuple[str, ...], out: int) -> torch.Tensor | None:
    """(N+1, out) fp32: m / ||W0 + s B A|| for the DoRA adapters among `names`, 1 for the others and the base."""
    doras = [n for n in names if n in layer.lora_magnitude_vector]
    if not doras:
        return None
    rows = [layer.lora_magnitude_vector[n].weight.float() / dora.weight_norm(layer, n) if n in doras
            else torch.ones(out, device=layer.lora_A[n].weight.device if n in layer.lora_A else None)
            for n in names]
    device = rows[0].device
    return torch.stack([r.to(device) for r in rows] + [torch.ones(out, device=device)])


def _watched(layer: nn.Module, names: tuple[str, ...]) -> list[torch.Tensor]:
    """The tensors the stacks of `layer` are built from: each adapter's factors (and, for DoRA, the base weight)."""
    out = []
    for table in tables_of(layer) + ("lora_magnitude_vector", "lora_E"):
        params = getattr(layer, table, {})
        out += [_weight(params[name]) for name in names if name in params]
    if any(n in layer.lora_magnitude_vector for n in names):  # DoRA's norms read the base weight too
        out.append(layer.base_layer.weight)
    return out


class StackCache:
    """The stacks of every LoRA layer for the adapters of the last mixed call, reused while none of their weights
    changed; owned by one LoraModel, which clears it when it adds or removes adapters.

    A call checks the watched tensors (found when the stacks are built) for a new storage or an in-place write
    (data pointer, version counter) and every layer's scalings: one pass over a flat list, since a server makes
    this check at every decoding step. (A factor module swapped in by hand, outside LoraModel's methods, is not
    watched: add or load adapters through LoraModel.)"""

    def __init__(self) -> None:
        self.clear()

    def get(self, layers: list[nn.Module], names: tuple[str, ...]) -> dict[nn.Module, Stacks | None]:
        """The stacks of `layers` for `names`: the cached ones while nothing they depend on changed."""
        if torch.is_grad_enabled():  # stacks inside the graph, so that the LoRA parameters get gradients
            return {m: build_stacks(m, names) for m in layers}
        if names != self.names or len(self.stacks) != len(layers) or self._versions(layers) != self.versions:
            with torch.no_grad():
                self.stacks = {m: build_stacks(m, names) for m in layers}
            self.names, self.watched = names, [t for m in layers for t in _watched(m, names)]
            self.versions = self._versions(layers)
        return self.stacks

    def _versions(self, layers: list[nn.Module]) -> tuple:
        assert self.names is not None
        return (tuple((t.data_ptr(), t._version) for t in self.watched),
                tuple(m.scaling.get(n) for m in layers for n in self.names))

    def clear(self) -> None:
        self.names: tuple[str, ...] | None = None
        self.versions: tuple = ()
        self.watched: list[torch.Tensor] = []
        self.stacks: dict[nn.Module, Stacks | None] = {}


# --- the per-row forwards ----------------------------------------------------------------------------------------
def linear_forward(layer: nn.Module, routing: Routing, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """result (the base output) + each row's scaling * B A x for a LoraLinear (DoRA rows rescaled by their g)."""
    stacks = None if layer.disabled else routing.stacks.get(layer)
    if stacks is None:
        return result
    batch = x.shape[0]
    slot = routing.rows_for(batch)
    x3 = x.reshape(batch, -1, x.shape[-1]).to(stacks.a.dtype)  # (B, T, in)
    in_place = stacks.dora_scale is None and not torch.is_grad_enabled() and result.is_contiguous()
    if routing.single:  # each row through its own adapter only
        if routing.groups is None:
            return result
        groups = routing.groups
        delta = _grouped_delta(stacks, groups, x3)  # (G*C, T, out)
        if not groups.identity:
            delta = delta.index_select(0, groups.source)  # (B, T, out): each row's own, zeros for base rows
        if in_place and result.dtype == delta.dtype:  # added into the base output
            result.view(delta.shape).add_(delta)
            return result
    else:  # weighted combinations: all adapters' A at once, each rank column weighted for its row
        h = F.linear(x3, stacks.a_cat)  # (B, T, N*R)
        h = h * routing.block_mask(stacks.a.shape[1], h)[:, None]
        if in_place and result.dtype == h.dtype:  # added into the base output
            return result.view(-1, result.shape[-1]).addmm_(h.view(-1, h.shape[-1]), stacks.b_cat).view(result.shape)
        delta = h @ stacks.b_cat  # (B, T, out)
    delta = delta.reshape(result.shape)
    if stacks.dora_scale is None:
        return result + delta.to(result.dtype)
    # DoRA rows: g * (W0 x + s B A x) + b; g is 1 for plain rows, the base and combinations (which hold no DoRA)
    bias = getattr(layer.base_layer, "bias", None)
    g = stacks.dora_scale[slot].reshape(batch, *([1] * (result.dim() - 2)), -1)  # (B, 1.., out)
    plain = result if bias is None else result - bias
    out = g * (plain.to(g.dtype) + delta.to(g.dtype))
    return (out if bias is None else out + bias).to(result.dtype)


def _grouped_delta(stacks: Stacks, groups: Groups, x3: torch.Tensor) -> torch.Tensor:
    """(G*C, T, out): scaling * B A x for each group row, through its group's adapter (padding rows give zeros)."""
    _, t, d = x3.shape
    rank, out = stacks.a.shape[1], stacks.b.shape[1]
    if groups.identity:
        xg = x3.view(-1, groups.size * t, d)  # (G, C*T, in): the rows are already in group order
    else:
        rows = F.pad(x3, (0, 0, 0, 0, 0, 1)) if groups.padded else x3  # (B + 1, T, in): row B is the zero row
        xg = rows.index_select(0, groups.gather).view(-1, groups.size * t, d)  # (G, C*T, in)
    a, b_t = stacks.a[:-1], stacks.b_cat.view(-1, rank, out)  # (N, R, in), (N, R, out) contiguous: B^T per adapter
    if groups.present.numel() != a.shape[0]:
        a, b_t = a.index_select(0, groups.present), b_t.index_select(0, groups.present)  # (G, R, in), (G, R, out)
    h = torch.bmm(xg, a.transpose(1, 2))  # (G, C*T, R)
    return torch.bmm(h, b_t).view(-1, t, out)  # (G*C, T, out)


def embedding_delta(layer: nn.Module, routing: Routing, ids: torch.Tensor) -> torch.Tensor | None:
    """Each row's scaling * (A^T[ids]) B^T for a LoraEmbedding; A is (r, vocab), so A^T[ids] is a row lookup."""
    stacks = None if layer.disabled else routing.stacks.get(layer)
    if stacks is None:
        return None
    slot = routing.rows_for(ids.shape[0])
    ids2 = ids.reshape(ids.shape[0], -1)  # (B, T)
    if routing.single:
        h = stacks.a.transpose(1, 2)[slot[:, None].expand_as(ids2), ids2]  # (B, T, R)
        y = torch.bmm(h, stacks.b[slot].transpose(1, 2))  # (B, T, dim)
    else:
        h = stacks.a_cat.T[ids2]  # (B, T, N*R)
        y = (h * routing.block_mask(stacks.a.shape[1], h)[:, None]) @ stacks.b_cat  # (B, T, dim)
    return y.reshape(*ids.shape, y.shape[-1])


def modules_to_save_forward(wrapper: nn.Module, routing: Routing, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Rows using an adapter with its own copy of the module run through that copy (rare: heads, embeddings)."""
    out = wrapper.original_module(x, *args, **kwargs)
    if wrapper.disabled:
        return out
    slot = routing.rows_for(x.shape[0])  # rows of a combination sit in the base slot (it holds no copy: checked)
    for i, name in enumerate(routing.names):
        rows = (slot == i).nonzero().flatten()
        if name in wrapper.modules_to_save and rows.numel():
            out = out.index_copy(0, rows, wrapper.modules_to_save[name](x[rows], *args, **kwargs))
    return out
