"""Runner: the running batch's tensors (KV cache, attention mask, next token and position per row) and the two
forwards — a prefill for newly admitted prompts, a decode step for every running row — each with one adapter (or a
weighted combination) per row through `LoraModel.forward(..., adapter_names=...)`.

Layout: every row is right-aligned, its last token in the cache's last column, left padding masked out. All rows
gain one column per step, so the cache is `rows x max(row length)` wide once the columns no row uses are trimmed
(after rows leave). A prefill runs the new prompts left-padded in a cache of their own (as `generation.generate`
does, so a row's numbers are those of `lorakit chat`); merging pads the narrower cache on the left and stacks
the rows:

    keys (B, H, W, D) + keys (k, H, W', D)  ->  (B + k, H, max(W, W'), D)

The cache is kv.py's: a decoding step writes its column into spare room instead of copying the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..generation import cache_argument, left_pad
from ..lora import LoraModel
from .kv import SlackCache
from .sequence import Adapter


@dataclass
class Batch:
    cache: SlackCache
    mask: torch.Tensor  # (B, W) long, 1 where a row has a token
    next_ids: torch.Tensor  # (B,) the token each row feeds at the next step
    positions: torch.Tensor  # (B,) that token's position

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @property
    def width(self) -> int:
        return self.mask.shape[1]


class Runner:
    def __init__(self, model: torch.nn.Module, pad_id: int) -> None:
        self.model, self.pad_id = model, pad_id

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _routing(self, adapters: list[Adapter]) -> dict:
        if not isinstance(self.model, LoraModel):
            return {}
        return {"adapter_names": [a if isinstance(a, str) else dict(a) for a in adapters]}

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], adapters: list[Adapter]) -> tuple[Batch, torch.Tensor]:
        """Run the new prompts; (their batch, next-token logits (k, V)). `next_ids` is for the caller to set."""
        ids, mask = left_pad(prompts, self.pad_id, self.device)  # (k, W'), (k, W')
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # left padding does not shift positions
        cache = SlackCache()
        keep = torch.tensor([ids.shape[1] - 1], device=self.device)  # the last position, as generate() keeps it
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=keep, **{cache_argument(self.model): cache}, **self._routing(adapters))
        lengths = mask.sum(dim=1)  # (k,)
        batch = Batch(cache, mask, torch.full_like(lengths, self.pad_id), lengths)
        return batch, out.logits[:, -1]

    @torch.inference_mode()
    def decode(self, batch: Batch, adapters: list[Adapter]) -> torch.Tensor:
        """One token per row; the cache and mask grow by one column; returns next-token logits (B, V)."""
        mask = torch.cat([batch.mask, batch.mask.new_ones(batch.rows, 1)], dim=1)  # (B, W + 1)
        out = self.model(input_ids=batch.next_ids[:, None], attention_mask=mask, position_ids=batch.positions[:, None],
                         use_cache=True, logits_to_keep=1, **{cache_argument(self.model): batch.cache},
                         **self._routing(adapters))
        batch.mask, batch.positions = mask, batch.positions + 1
        return out.logits[:, -1]


def merge(running: Batch | None, new: Batch) -> Batch:
    """The rows of `running` then those of `new`, in one cache right-aligned to the wider of the two."""
    if running is None:
        return new
    width = max(running.width, new.width)
    for a, b in zip(running.cache.layers, new.cache.layers, strict=True):
        a.stack(b, width)  # (B + k, H, width, D)
    mask = torch.cat([F.pad(running.mask, (width - running.width, 0)), F.pad(new.mask, (width - new.width, 0))])
    return Batch(running.cache, mask, torch.cat([running.next_ids, new.next_ids]),
                 torch.cat([running.positions, new.positions]))


def keep_rows(batch: Batch, rows: list[int]) -> Batch | None:
    """Only `rows` (indices into the batch), with the leading columns that no remaining row uses trimmed away."""
    if not rows:
        return None
    index = torch.tensor(rows, dtype=torch.long, device=batch.mask.device)
    mask = batch.mask.index_select(0, index)
    first = int(mask.any(dim=0).to(torch.int8).argmax())  # the first column some row still uses
    for layer in batch.cache.layers:
        layer.select(index, first)  # (rows, H, W - first, D)
    return Batch(batch.cache, mask[:, first:], batch.next_ids.index_select(0, index),
                 batch.positions.index_select(0, index))
