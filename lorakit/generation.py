"""Token generation with a KV cache: batched, left-padded, greedy or sampled, one adapter per row if asked.

The prompt runs once (only its last position goes through the output head, `logits_to_keep=1`); each later
step feeds one token per row and reuses the cache. Rows stop independently at a stop token.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache


@dataclass
class Sampling:
    """How the next token is chosen. temperature 0 means greedy."""

    max_new_tokens: int = 256
    """Upper bound on generated tokens per row."""
    temperature: float = 0.0
    """Softmax temperature; 0 picks the most likely token (greedy)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: int = 0
    """Keep only the k most likely tokens (0: no limit)."""
    repetition_penalty: float = 1.0
    """> 1 discourages tokens already in the prompt or the answer (CTRL paper rule)."""
    seed: int | None = None
    """Seed for sampling, for reproducible answers."""

    def __post_init__(self) -> None:
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if problems:
            raise ValueError("; ".join(problems))


def next_tokens(logits: torch.Tensor, seen: torch.Tensor, sampling: Sampling,
                generator: torch.Generator | None) -> torch.Tensor:
    """Pick one token per row from `logits` (B, V); `seen` (B, T) holds the ids to penalise."""
    logits = logits.float()
    if sampling.repetition_penalty != 1.0:
        prior = logits.gather(1, seen)  # (B, T)
        prior = torch.where(prior > 0, prior / sampling.repetition_penalty, prior * sampling.repetition_penalty)
        logits = logits.scatter(1, seen, prior)
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > sampling.top_p  # mass before this token already reaches top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def cache_argument(model: torch.nn.Module) -> str:
    """The KV-cache keyword of the model's forward: `cache` in recent transformers (which deprecates
    `past_key_values`), `past_key_values` before."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def generate(model: torch.nn.Module, prompts: list[list[int]], sampling: Sampling, stop_ids: set[int],
             pad_id: int, adapter_names: list[str] | None = None,
             on_token: Callable[[int, int], None] | None = None,
             should_stop: Callable[[], bool] | None = None) -> list[list[int]]:
    """Generate a continuation for each prompt (token ids); returns the new ids per row, stop token excluded.

    `on_token(row, id)` is called as tokens arrive (for streaming); `should_stop()` can end generation early.
    `adapter_names` (LoraModel only) picks an adapter per row.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id, device)
    extra = {"adapter_names": adapter_names} if adapter_names is not None else {}
    generator = torch.Generator(device=device).manual_seed(sampling.seed) if sampling.seed is not None else None
    cache = {cache_argument(model): DynamicCache()}  # filled in place by every forward
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # (B, T): left padding does not shift positions
    step_ids, seen = ids, ids
    outputs: list[list[int]] = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    # the prompt's last position as an index, not a slice: the gathered (B, 1, H) rows are contiguous, so the
    # head is one matmul; a strided slice into a frozen head's weight makes torch broadcast it into a bmm (2x slower)
    keep: int | torch.Tensor = torch.tensor([ids.shape[1] - 1], device=device)
    for _ in range(sampling.max_new_tokens):
        out = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                    logits_to_keep=keep, **cache, **extra)
        keep = 1
        token = next_tokens(out.logits[:, -1], seen, sampling, generator)  # (B,)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        for row, t in enumerate(token.tolist()):
            if done[row]:
                continue
            if t in stop_ids:
                done[row] = True
                continue
            outputs[row].append(t)
            if on_token is not None:
                on_token(row, t)
        if bool(done.all()) or (should_stop is not None and should_stop()):
            break
        step_ids = token[:, None]  # (B, 1)
        seen = torch.cat([seen, step_ids], dim=1)
        mask = torch.cat([mask, (~done).long()[:, None]], dim=1)
        positions = positions[:, -1:] + 1
    return outputs


class TextStream:
    """Turns token ids arriving one by one into printable text increments (handles multi-byte characters)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.printed = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        new, self.printed = text[self.printed:], len(text)
        return new

    def flush(self) -> str:
        """Whatever is left at the end, even an incomplete character."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        new, self.printed = text[self.printed:], len(text)
        return new
