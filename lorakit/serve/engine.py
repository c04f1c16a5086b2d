"""Engine: the thread that owns the model. Other threads `add` sequences, `abort` them and `call` functions that
change the model (adapter loading); the loop applies those between steps. One step:

    drain the inbox -> retire cancelled rows -> admit waiting sequences (scheduler) -> prefill them (runner)
    -> one decode forward for every running row (runner) -> sample each row -> retire finished rows

Each row samples with its own settings and generator (`generation.next_tokens`; greedy rows in one argmax).
Failures stay local: a row whose sampling or text fails gets an error event alone; a prefill that raises is
retried prompt by prompt so that only the prompt at fault fails; a decode forward that raises fails the rows of
that batch and the engine goes on with the next requests.
"""

from __future__ import annotations

import concurrent.futures
import sys
import threading
import time
import traceback
from collections.abc import Callable

import torch

from ..generation import next_tokens
from .metrics import Metrics
from .registry import Registry
from .runner import Batch, Runner, keep_rows, merge
from .scheduler import Limits, Scheduler
from .sequence import Sequence


class QueueFull(Exception):
    pass


class Engine:
    def __init__(self, registry: Registry, limits: Limits, max_queue: int, metrics: Metrics) -> None:
        tokenizer = registry.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(registry.base.stop_ids)
        self.registry, self.metrics, self.max_queue = registry, metrics, max_queue
        self.runner = Runner(registry.model, pad)
        self.scheduler = Scheduler(limits)
        self.batch: Batch | None = None
        self._lock = threading.Lock()
        self._inbox: list[Sequence] = []
        self._calls: list[tuple[Callable[[], object], concurrent.futures.Future]] = []
        self._pending = 0  # accepted, not yet running: the queue that max_queue bounds
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="lorakit-engine", daemon=True)

    # --- any thread --------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def add(self, seq: Sequence) -> None:
        """Queue a sequence; QueueFull when max_queue requests already wait."""
        with self._lock:
            if self._stop:
                raise QueueFull("the server is shutting down")
            if self._pending >= self.max_queue:
                raise QueueFull(f"{self._pending} requests are waiting (max_queue {self.max_queue}); retry later")
            self._pending += 1
            self._inbox.append(seq)
            self.metrics.queue.set(self._pending)
        self._wake.set()

    def abort(self, seq: Sequence) -> None:
        """Cancel a sequence (its client went away); its row is freed at the next step."""
        seq.cancelled = True
        self._wake.set()

    def call(self, fn: Callable[[], object]) -> concurrent.futures.Future:
        """Run `fn` on the engine thread between two steps; its result or exception comes back in the future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._calls.append((fn, future))
        self._wake.set()
        return future

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop: sequences still waiting or running get an error event; joins the thread."""
        with self._lock:
            self._stop = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # --- the engine thread -------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            self._wake.clear()
            self._drain()
            if self._stop:
                break
            if not self.scheduler.running and not self.scheduler.waiting:
                self._wake.wait()
                continue
            self._step()
        for seq in list(self.scheduler.waiting) + self.scheduler.running:
            if not seq.finished:
                seq.fail("the server is shutting down")

    def _drain(self) -> None:
        with self._lock:
            new, self._inbox = self._inbox, []
            calls, self._calls = self._calls, []
        for seq in new:
            self.scheduler.add(seq)
        for fn, future in calls:
            try:
                future.set_result(fn())
            except Exception as exc:  # handed to the caller, who answers its request with it
                future.set_exception(exc)
        self.runner.model = self.registry.model  # a first runtime adapter turns the model into a LoraModel
        gone = self.scheduler.drop_cancelled()
        if gone:
            self._count_pending(-len(gone))
        self._detach_unloaded()

    def _count_pending(self, delta: int) -> None:
        with self._lock:
            self._pending += delta
            self.metrics.queue.set(self._pending)

    def _detach_unloaded(self) -> None:
        for name, entry in list(self.registry.entries.items()):
            if entry.unloading and not self.scheduler.uses(name):
                self.registry.detach(name)
        self.runner.model = self.registry.model

    def _step(self) -> None:
        self._retire()
        admitted = self.scheduler.admit()
        if admitted:
            self._count_pending(-len(admitted))
            self._prefill(admitted)
        if self.batch is not None:
            rows = self.scheduler.running
            try:
                logits = self.runner.decode(self.batch, [s.adapter for s in rows])
            except Exception as exc:
                self._fail_batch(exc)
            else:
                self.metrics.decode_steps.inc()
                self._sample(rows, logits, self.batch)
        self._retire()
        self.metrics.running.set(len(self.scheduler.running))

    def _prefill(self, seqs: list[Sequence]) -> None:
        """Prefill the admitted prompts together (one by one when that raises); merge them into the batch."""
        groups = [seqs]
        try:
            parts = [self.runner.prefill([s.prompt for s in seqs], [s.adapter for s in seqs])]
        except Exception:
            parts, groups = [], []
            for seq in seqs:
                try:
                    parts.append(self.runner.prefill([seq.prompt], [seq.adapter]))
                    groups.append([seq])
                except Exception as exc:
                    _log(exc)
                    seq.fail(f"the engine failed on this request: {_one_line(exc)}")
        for group, (part, logits) in zip(groups, parts):
            self.metrics.prompt_tokens.inc(sum(len(s.prompt) for s in group))
            self._sample(group, logits, part)
        # rows of `running` are in admission order; failed prefills have no row and are removed here
        alive = set(id(s) for group in groups for s in group)
        self.scheduler.running = [s for s in self.scheduler.running if s not in seqs or id(s) in alive]
        for part, _ in parts:
            self.batch = merge(self.batch, part)

    def _sample(self, rows: list[Sequence], logits: torch.Tensor, batch: Batch) -> None:
        """Pick each row's next token (greedy rows together), hand it to the sequence, set it as the next input."""
        tokens = logits.float().argmax(dim=-1)  # (B,) greedy for every row; sampled rows are replaced below
        now = time.perf_counter()
        for i, seq in enumerate(rows):
            if seq.finished:
                continue
            try:
                s = seq.sampling
                if s.temperature > 0 or s.repetition_penalty != 1.0:
                    tokens[i] = next_tokens(logits[i:i + 1], seq.seen(logits.device), s, seq.generator)[0]
                token = int(tokens[i])
                self._time(seq, now)
                seq.accept(token)
            except Exception as exc:
                _log(exc)
                seq.fail(f"the engine failed on this request: {_one_line(exc)}")
        batch.next_ids = tokens

    def _time(self, seq: Sequence, now: float) -> None:
        if seq.last_token_at is None:
            self.metrics.ttft.observe(now - seq.arrived)
        else:
            self.metrics.itl.observe(now - seq.last_token_at)
        seq.last_token_at = now
        self.metrics.generated_tokens.inc()

    def _retire(self) -> None:
        if self.batch is None:
            return
        keep, gone = self.scheduler.retire()
        if gone:
            self.batch = keep_rows(self.batch, keep)

    def _fail_batch(self, exc: Exception) -> None:
        _log(exc)
        for seq in self.scheduler.running:
            if not seq.finished:
                seq.fail(f"the engine failed on this batch: {_one_line(exc)}")
        self.scheduler.running, self.batch = [], None


def _one_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _log(exc: BaseException) -> None:
    print("lorakit serve: engine error:\n" + "".join(traceback.format_exception(exc)), file=sys.stderr, flush=True)
