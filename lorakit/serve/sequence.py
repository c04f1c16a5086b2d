"""Sequence: one request inside the engine: its prompt ids, adapter, sampling settings and random generator, stop
tokens and stop strings, the ids generated so far, the text handed out so far, and where events go.

Text leaves in increments (`TextStream`, whole characters only). A stop string ends the answer where it begins and
is not part of it (OpenAI's rule), so text that could still turn into a stop string is held back until it cannot.
Events go to `emit` (called on the engine thread; the HTTP layer hands them to its event loop):

    Event("text", text=...)    zero or more
    Event("done", finish_reason="stop" | "length", prompt_tokens=..., completion_tokens=...)   or
    Event("error", text=message)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..generation import Sampling, TextStream

Adapter = str | tuple[tuple[str, float], ...]  # a name ("__base__": none) or a weighted combination


@dataclass(frozen=True)
class Event:
    kind: str  # "text" | "done" | "error"
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt: list[int]
    adapter: Adapter
    sampling: Sampling  # max_new_tokens is the request's max_tokens
    stop_ids: frozenset[int]
    stop: tuple[str, ...]
    stream: TextStream
    emit: Callable[[Event], None]
    generator: torch.Generator | None = None
    output: list[int] = field(default_factory=list)
    text: str = ""  # the answer's text so far (stop strings cut off)
    sent: int = 0  # how much of `text` has been emitted
    finish_reason: str | None = None  # "stop" | "length" | "error"
    ended_by_token: bool = False
    cancelled: bool = False
    arrived: float = field(default_factory=time.perf_counter)
    last_token_at: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.cancelled

    @property
    def reserved(self) -> int:
        """Tokens this row may hold in the KV cache at most: prompt + max_tokens."""
        return len(self.prompt) + self.sampling.max_new_tokens

    def seen(self, device: torch.device) -> torch.Tensor:
        """(1, T) prompt and answer ids, for the repetition penalty."""
        return torch.tensor([self.prompt + self.output], dtype=torch.long, device=device)

    def accept(self, token: int) -> None:
        """Take the next token: a stop token, a stop string or the length limit ends the sequence; text goes out as
        it settles."""
        if token in self.stop_ids:
            self.ended_by_token = True
            self._finish("stop")
            return
        self.output.append(token)
        self.text += self.stream.push(token)
        if self._cut():
            self._finish("stop", flush=False)
        elif len(self.output) >= self.sampling.max_new_tokens:
            self._finish("length")
        else:
            self._send(len(self.text) - self._held())

    def completion_tokens(self) -> int:
        """Tokens generated; a stop token counts (it took a step, as max_tokens counts steps)."""
        return len(self.output) + int(self.ended_by_token)

    def fail(self, message: str) -> None:
        self.finish_reason = "error"
        self.emit(Event("error", text=message))

    def _cut(self) -> bool:
        """Cut the text where the earliest stop string starts, if one has appeared (it can only start in the part
        not yet sent: a possible start is held back)."""
        found = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
        if not found:
            return False
        self.text = self.text[:min(found)]
        return True

    def _held(self) -> int:
        """How many trailing characters could still be the start of a stop string."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text) - self.sent), longest, -1):
                if self.text.endswith(s[:k]):
                    longest = k
                    break
        return longest

    def _send(self, end: int) -> None:
        if end > self.sent:
            self.emit(Event("text", text=self.text[self.sent:end]))
            self.sent = end

    def _finish(self, reason: str, flush: bool = True) -> None:
        if flush:  # an incomplete character at the end goes out as the decoder renders it
            self.text += self.stream.flush()
            if self._cut():
                reason = "stop"
        self.finish_reason = reason
        self._send(len(self.text))
        self.emit(Event("done", finish_reason=reason, prompt_tokens=len(self.prompt),
                        completion_tokens=self.completion_tokens()))
