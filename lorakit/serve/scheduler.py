"""Scheduler: waiting and running sequences, and admission under the batch's limits.

A waiting sequence joins the running batch (first come, first served; none is skipped, so none starves) while

    rows + 1 <= max_batch,
    (rows + 1) * max(reserved over the rows and it) <= kv_budget,     reserved = prompt + max_tokens,
    the prompts admitted in this step hold <= prefill_tokens tokens (at least one prompt is always admitted).

The second rule bounds the KV cache: rows are right-aligned and trimmed (runner.py), so the cache is never wider
than the longest row, which never outgrows its reservation. The order of `running` is the batch's row order.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .sequence import Sequence


@dataclass(frozen=True)
class Limits:
    max_batch: int
    kv_budget: int  # tokens of KV cache, all rows together
    prefill_tokens: int  # padded prompt tokens run in one prefill

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.kv_budget < 1 or self.prefill_tokens < 1:
            raise ValueError(f"limits must be >= 1, got {self}")


class Scheduler:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def drop_cancelled(self) -> list[Sequence]:
        """Remove cancelled sequences that never started; returns them."""
        gone = [s for s in self.waiting if s.cancelled]
        if gone:
            self.waiting = deque(s for s in self.waiting if not s.cancelled)
        return gone

    def admit(self) -> list[Sequence]:
        """Move the sequences that fit from the front of the queue to the end of the running batch."""
        admitted: list[Sequence] = []
        widest = max((s.reserved for s in self.running), default=0)
        longest_prompt = 0
        while self.waiting:
            seq = self.waiting[0]
            rows = len(self.running) + len(admitted) + 1
            wide = max(widest, seq.reserved)
            longest = max(longest_prompt, len(seq.prompt))
            fits = rows <= self.limits.max_batch and rows * wide <= self.limits.kv_budget
            if not fits or admitted and longest * (len(admitted) + 1) > self.limits.prefill_tokens:
                break
            admitted.append(self.waiting.popleft())
            widest, longest_prompt = wide, longest
        self.running += admitted
        return admitted

    def retire(self) -> tuple[list[int], list[Sequence]]:
        """(batch rows that go on, sequences that left: finished or cancelled)."""
        keep = [i for i, s in enumerate(self.running) if not s.finished]
        gone = [s for s in self.running if s.finished]
        self.running = [self.running[i] for i in keep]
        return keep, gone

    def uses(self, adapter: str) -> bool:
        """Whether a waiting or running sequence still needs `adapter` (alone or in a combination)."""
        def needs(seq: Sequence) -> bool:
            return seq.adapter == adapter if isinstance(seq.adapter, str) else adapter in dict(seq.adapter)
        return any(needs(s) for s in self.waiting) or any(needs(s) for s in self.running)
