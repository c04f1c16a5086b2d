"""The running batch's KV cache: a transformers `Cache` whose layers keep keys and values in buffers with spare
columns, so that a decoding step writes its one new column in place. (transformers' `DynamicLayer` concatenates:
every step copies the whole cache, rows x width x layers, which grows with the context.)

    buffer (B, H, capacity, D),  keys = buffer[:, :, :width]   a view; capacity - width spare columns

A layer without a spare column takes SPARE more (one copy every SPARE steps); building a batch (merging two, dropping
rows: runner.py) writes the rows into a fresh buffer once. Rows stay right-aligned, as runner.py lays them out:

    stack:   (B, H, W, D) + (k, H, W', D)  ->  (B + k, H, max(W, W'), D), each padded with zeros on the left
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

SPARE = 64  # columns a buffer gains when it is full: the memory over the cache's width is at most rows x SPARE


class SlackLayer(DynamicLayer):
    """A DynamicLayer whose keys and values are views of the first `width` columns of larger buffers."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor,
                                                                                                      torch.Tensor]:
        """Append (B, H, T, D) keys and values; returns the layer's (B, H, width + T, D) views."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.assign(key_states, value_states)
            return self.keys, self.values
        width, new = self.keys.shape[-2], key_states.shape[-2]
        if not self._holds_views() or width + new > self._keys.shape[-2]:
            self.assign(self.keys, self.values, spare=max(SPARE, new))
        self._keys[:, :, width:width + new].copy_(key_states)
        self._values[:, :, width:width + new].copy_(value_states)
        self.keys, self.values = self._keys[:, :, :width + new], self._values[:, :, :width + new]
        return self.keys, self.values

    def _holds_views(self) -> bool:
        """False when something outside `update` replaced keys/values (e.g. DynamicLayer's own batch methods)."""
        buffer = getattr(self, "_keys", None)
        return buffer is not None and self.keys.data_ptr() == buffer.data_ptr() \
            and self.values.data_ptr() == self._values.data_ptr()

    def assign(self, keys: torch.Tensor, values: torch.Tensor, spare: int = SPARE) -> None:
        """Hold these (B, H, W, D) keys and values (copied) with `spare` free columns after them."""
        width = keys.shape[-2]
        self._take(_buffer(keys, width + spare), _buffer(values, width + spare), width)
        self.keys.copy_(keys)
        self.values.copy_(values)

    def stack(self, other: SlackLayer, width: int) -> None:
        """This layer's rows, then `other`'s, right-aligned at `width` columns (zeros on the left), written once
        into a fresh buffer with SPARE free columns."""
        rows, parts = self.keys.shape[0], ((self.keys, other.keys), (self.values, other.values))
        shape = (rows + other.keys.shape[0], self.keys.shape[1], width + SPARE, self.keys.shape[-1])
        buffers = [self.keys.new_zeros(shape), self.values.new_zeros(shape)]  # (B + k, H, width + SPARE, D)
        for buffer, (mine, theirs) in zip(buffers, parts):
            buffer[:rows, :, width - mine.shape[-2]:width] = mine
            buffer[rows:, :, width - theirs.shape[-2]:width] = theirs
        self._take(*buffers, width)

    def _take(self, keys: torch.Tensor, values: torch.Tensor, width: int) -> None:
        """Make these (B, H, capacity, D) buffers the layer's, its first `width` columns the cache."""
        self._keys, self._values = keys, values
        self.keys, self.values = keys[:, :, :width], values[:, :, :width]
        self.device, self.dtype, self.is_initialized = keys.device, keys.dtype, True

    def select(self, index: torch.Tensor, first: int) -> None:
        """Keep the rows `index` and the columns from `first` on."""
        self.assign(self.keys.index_select(0, index)[:, :, first:], self.values.index_select(0, index)[:, :, first:])


def _buffer(like: torch.Tensor, capacity: int) -> torch.Tensor:
    return like.new_zeros((*like.shape[:2], capacity, like.shape[-1]))  # (B, H, capacity, D)


class SlackCache(Cache):
    """A Cache of SlackLayers, one per decoder layer (made as the model's forward reaches them)."""

    def __init__(self) -> None:
        super().__init__(layer_class_to_replicate=SlackLayer)
