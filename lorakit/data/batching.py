"""Examples to batches: validation split, padding collate, packing, and a resumable, seeded batch order (with
several ranks: one global order cut into global micro-batches, each split by rank, `rank_share`).

Two kinds of batch come out, both dicts of torch tensors of shape (B, T):

- padded (`pad_collate`): `input_ids`, `attention_mask` (1 = real token), `labels` (-100 on padding). Right
  padding, so the model's default position ids are right.
- packed (`pack_examples` + `collate_packed`): `input_ids`, `labels`, `position_ids`, and NO `attention_mask`.
  `position_ids` restart at 0 at each example (and at the padding tail). transformers (checked in 5.23) reads
  such position ids as packed sequences and builds a block-diagonal causal mask for eager and SDPA attention
  (`masking_utils.find_packed_sequence_indices`; flash-attention takes them as varlen boundaries), but only when
  no 2-D attention_mask and no cache are passed: call the model with `use_cache=False`. With the config's
  default `use_cache=True` a DynamicCache is built even in training, the packing is silently ignored and the
  examples of a row attend to each other. `packed_attention_mask` builds the 4-D mask explicitly for code paths
  that need one. The first token of each example has label -100, so no label points across examples.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator

import numpy as np
import torch

from .encode import IGNORE_INDEX
from .formats import DataError


def split_validation(examples: list[dict], val_size: float | int | None, seed: int = 0) -> tuple[list, list]:
    """(train, val): a seeded shuffle, then `val_size` examples (an int count, or a float fraction in (0, 1)) for
    validation; both keep the original order of their examples. No split when val_size is 0 or None."""
    if not val_size:
        return list(examples), []
    if isinstance(val_size, float) and 0 < val_size < 1:
        n_val = max(1, round(len(examples) * val_size))
    elif isinstance(val_size, int) or (isinstance(val_size, float) and val_size.is_integer() and val_size >= 1):
        n_val = int(val_size)
    else:
        raise DataError(f"val_size must be a fraction in (0, 1) or a count, got {val_size!r}")
    if not 0 < n_val < len(examples):
        raise DataError(f"val_size={val_size!r} leaves no training examples ({len(examples)} in all)")
    order = np.random.default_rng(seed).permutation(len(examples))
    val_ids = set(order[:n_val].tolist())
    train = [e for i, e in enumerate(examples) if i not in val_ids]
    return train, [e for i, e in enumerate(examples) if i in val_ids]


def pad_collate(examples: list[dict], pad_token_id: int, pad_to_multiple_of: int | None = None,
                round_width: Callable[[int], int] | None = None) -> dict:
    """Right-pad to the longest example (then up to `round_width(T)` or a multiple of `pad_to_multiple_of`):
    input_ids, attention_mask, labels, each (B, T)."""
    width = max(len(e["input_ids"]) for e in examples)
    if round_width:
        width = round_width(width)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)  # (B, T)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        attention_mask[row, :n] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    return {**batch, **replay_mask(examples, width)}


def replay_mask(items: list[dict], width: int) -> dict:
    """{"replay": (B, T) bool, True on the tokens of replay examples} when any item is marked (an example's
    "replay": True, a packed row's "replay": one bool per token); {} otherwise."""
    if not any("replay" in item for item in items):
        return {}
    mask = torch.zeros((len(items), width), dtype=torch.bool)  # (B, T)
    for row, item in enumerate(items):
        marks = item.get("replay", False)
        n = len(item["input_ids"])
        mask[row, :n] = torch.tensor(marks) if isinstance(marks, list) else bool(marks)
    return {"replay": mask}


def pack_examples(examples: list[dict], max_len: int) -> list[dict]:
    """Pack examples into rows of at most `max_len` tokens: best-fit over lengths in decreasing order.

    Each row is `{"input_ids", "labels", "position_ids", "lengths"}` (plain lists); position ids restart at 0 for
    each example. The packing is deterministic; the batch order shuffles the rows.
    """
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    rows: list[list[int]] = []  # example indices per row
    free: list[tuple[int, int]] = []  # (space left, row index), sorted
    for i in order:
        n = len(examples[i]["input_ids"])
        if n > max_len:
            raise DataError(f"an example has {n} tokens, more than the packing length {max_len}; "
                            "set cutoff_len no larger than the packing length")
        at = bisect.bisect_left(free, (n, -1))  # the fullest row that still has room
        if at < len(free):
            space, row = free.pop(at)
            rows[row].append(i)
        else:
            space, row = max_len, len(rows)
            rows.append([i])
        if space - n > 0:
            bisect.insort(free, (space - n, row))
    return [_join([examples[i] for i in sorted(row)]) for row in rows]


def _join(parts: list[dict]) -> dict:
    row = {"input_ids": [], "labels": [], "position_ids": [], "lengths": []}
    for e in parts:
        n = len(e["input_ids"])
        row["input_ids"] += e["input_ids"]
        row["labels"] += [IGNORE_INDEX] + list(e["labels"][1:])  # the first token is never a target
        row["position_ids"] += list(range(n))
        row["lengths"].append(n)
    if any("replay" in e for e in parts):
        row["replay"] = [bool(e.get("replay", False)) for e in parts for _ in e["input_ids"]]
    return row


def collate_packed(rows: list[dict], pad_token_id: int, round_width: Callable[[int], int] | None = None) -> dict:
    """Right-pad packed rows to the longest (then up to `round_width(T)`): input_ids, labels, position_ids, each
    (B, T); no attention_mask (see module doc). A row's padding is a sequence of its own (positions from 0)."""
    width = max(len(r["input_ids"]) for r in rows)
    if round_width:
        width = round_width(width)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    position_ids = torch.arange(width).repeat(len(rows), 1)  # (B, T)
    for row, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[row, :n] = torch.tensor(r["input_ids"])
        labels[row, :n] = torch.tensor(r["labels"])
        position_ids[row, :n] = torch.tensor(r["position_ids"])
        position_ids[row, n:] -= n  # the padding tail is a sequence of its own, starting at 0
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, **replay_mask(rows, width)}


def packed_attention_mask(position_ids: torch.Tensor, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """The block-diagonal causal mask of packed rows, (B, 1, T, T): a token sees earlier tokens of its own example.

    bool: True = may attend (SDPA's convention); a float dtype gives the additive form (0 or the dtype's minimum)
    that eager attention expects.
    """
    seq = (position_ids == 0).cumsum(-1)  # (B, T) example index of each token
    same = seq[:, :, None] == seq[:, None, :]  # (B, T, T)
    T = position_ids.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=position_ids.device).tril()  # (T, T)
    allowed = (same & causal)[:, None]  # (B, 1, T, T)
    if dtype == torch.bool:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def batch_order(lengths: list[int], batch_size: int, seed: int, epoch: int = 0, group_by_length: bool = False,
                drop_last: bool = False) -> list[list[int]]:
    """Index lists of one epoch's batches, a pure function of (seed, epoch).

    Plain: a seeded shuffle cut into batches. group_by_length: the shuffle is sorted by length (ties stay shuffled),
    cut into batches of similar length, and the batches are shuffled, so little compute goes to padding.
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}")
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths)).tolist()
    if drop_last:  # drop a random remainder (not the longest examples, which would be last after sorting)
        order = order[:len(order) - len(order) % batch_size]
    if group_by_length:
        order.sort(key=lambda i: lengths[i])
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if group_by_length:
        batches = [batches[i] for i in rng.permutation(len(batches)).tolist()]
    return batches


def rank_share(batch: list[int], rank: int, world_size: int) -> tuple[list[int], bool]:
    """Rank `rank`'s part of one global micro-batch (item indices), and whether it is padding.

    The batch is cut into `world_size` consecutive parts whose sizes differ by at most one, so a full batch of
    per_device x world_size items gives every rank per_device of them, and the parts of all ranks together are the
    batch a single process would take. A rank whose part is empty (an epoch's tail with fewer items than ranks)
    gets the batch's first item as padding, trained with weight 0: no rank waits on another, and the step's
    gradient is the same as one process's.
    """
    base, extra = divmod(len(batch), world_size)
    start = rank * base + min(rank, extra)
    part = batch[start:start + base + (rank < extra)]
    return (part, False) if part else (batch[:1], True)


def iterate_batches(items: list[dict], batch_size: int, pad_token_id: int, seed: int, epoch: int = 0,
                    start: int = 0, group_by_length: bool = False, drop_last: bool = False) -> Iterator[dict]:
    """The batches of one epoch from batch index `start` on (to resume mid-epoch): same (seed, epoch), same batches.

    `items` are examples (padded batches) or packed rows from `pack_examples` (packed batches).
    `len(batch_order(...))` is the number of batches per epoch.
    """
    if not items:
        raise DataError("iterate_batches got no examples")
    packed = "position_ids" in items[0]
    if any(("position_ids" in it) != packed for it in items):
        raise DataError("iterate_batches got a mix of packed rows and plain examples")
    lengths = [len(it["input_ids"]) for it in items]
    for indices in batch_order(lengths, batch_size, seed, epoch, group_by_length, drop_last)[start:]:
        chunk = [items[i] for i in indices]
        yield collate_packed(chunk, pad_token_id) if packed else pad_collate(chunk, pad_token_id)
