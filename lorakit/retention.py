"""Retention: how much of the base model's general behaviour an adapter keeps, on a probe set of everyday prompts.

A probe is a short general prompt (a fact, a sum, a word question, a simple instruction) with the keywords a right
answer contains; `data/retention_probes.json` ships 181 of them, none about any fine-tuning data. Two numbers per
adapter:

    retention = |{p : base right on p and adapter right on p}| / |{p : base right on p}|
    kl        = mean over positions t of KL(P_base(. | x_<t) || P_adapter(. | x_<t))
              = mean_t sum_v P_base(v) (log P_base(v) - log P_adapter(v))

"Right" is the greedy answer (at most `MAX_NEW_TOKENS` tokens) containing one of the probe's keywords (case and
punctuation insensitive, whole words: `metrics.contains`). The KL positions are the first `KL_POSITIONS` of the
base's own greedy answer, teacher-forced: the sequence is prompt + the base's answer, and position t is the one that
predicts answer token t (t = 0 is the prompt's last position, which predicts the first answer token), for
t < min(KL_POSITIONS, answer length), at least one position per probe. Every position of every probe weighs the
same. An adapter with B = 0 gives retention 1 and KL 0; the KL sees changes the keyword check cannot (a different
phrasing of a right answer).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .adapters import use_adapter
from .generation import Sampling, generate
from .lora.mixed import BASE
from .metrics import contains, wilson_interval

PROBES = Path(__file__).resolve().parent / "data" / "retention_probes.json"
KINDS = ("fact", "arithmetic", "language", "instruction")
MAX_NEW_TOKENS = 32  # longest probe answer; every keyword of the shipped probes fits in the first sentence
KL_POSITIONS = 16


class ProbeError(ValueError):
    """A probe file that cannot be used; the message names the file, the probe and the field."""


@dataclass
class Probe:
    """One general prompt and the keywords (any one of them) a right answer contains."""

    prompt: str
    answers: list[str]
    kind: str = "fact"


@dataclass
class ProbeAnswers:
    """One model's greedy answers to the probes: the rendered prompts, the answer ids and texts, right or not."""

    name: str
    prompt_ids: list[list[int]]
    ids: list[list[int]]
    texts: list[str]
    right: list[bool]

    @property
    def score(self) -> float:
        return sum(self.right) / max(len(self.right), 1)


def load_probes(path: str | Path | None = None) -> list[Probe]:
    """The probes of a JSON file (a list of {"prompt", "answer": str or [str], "kind"}); default the shipped set.

    Raises ProbeError (one line: file, probe index, field) on the first bad probe.
    """
    path = Path(path) if path else PROBES
    if not path.is_file():
        raise ProbeError(f"retention probes: file '{path}' not found")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ProbeError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
    if not isinstance(raw, list) or not raw:
        raise ProbeError(f"{path}: expected a non-empty JSON list of probes")
    probes = []
    for i, item in enumerate(raw):
        where = f"{path}[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not item["prompt"].strip():
            raise ProbeError(f"{where}: a probe needs a non-empty string 'prompt'")
        answer = item.get("answer")
        answers = [answer] if isinstance(answer, str) else answer
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            raise ProbeError(f"{where}: 'answer' must be a keyword or a non-empty list of keywords")
        probes.append(Probe(item["prompt"], answers, str(item.get("kind", "fact"))))
    return probes


def ask(model, tokenizer, probes: list[Probe], name: str, render, stop_ids: set[int],
        max_new_tokens: int = MAX_NEW_TOKENS, batch_size: int = 32) -> ProbeAnswers:
    """Greedy answers of adapter `name` ("__base__": none) to every probe, batched by prompt length."""
    prompt_ids = [render([{"role": "user", "content": p.prompt}]) for p in probes]
    order = sorted(range(len(probes)), key=lambda i: len(prompt_ids[i]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop_ids)
    ids: list[list[int]] = [[] for _ in probes]
    with use_adapter(model, name):
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            outs = generate(model, [prompt_ids[i] for i in chunk], Sampling(max_new_tokens=max_new_tokens),
                            stop_ids, pad)
            for i, out in zip(chunk, outs):
                ids[i] = out
    texts = [tokenizer.decode(out, skip_special_tokens=True).strip() for out in ids]
    right = [bool(contains(text, p.answers)) for text, p in zip(texts, probes)]
    return ProbeAnswers(name, prompt_ids, ids, texts, right)


@torch.no_grad()
def kl_to_base(model, name: str, base: ProbeAnswers, positions: int = KL_POSITIONS, batch_size: int = 16,
               pad_id: int = 0) -> float:
    """Mean KL(P_base || P_adapter) over the first `positions` positions of the base's answers (see the module)."""
    device = next(model.parameters()).device
    seqs, spans = [], []
    for prompt, answer in zip(base.prompt_ids, base.ids):
        k = max(1, min(positions, len(answer)))
        seqs.append(prompt + answer[:k - 1])  # position len(prompt)-1+t predicts answer token t, t < k
        spans.append((len(prompt) - 1, k))
    total, count = 0.0, 0
    for start in range(0, len(seqs), batch_size):
        rows, where = seqs[start:start + batch_size], spans[start:start + batch_size]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, seq in enumerate(rows):
            ids[r, :len(seq)], mask[r, :len(seq)] = torch.tensor(seq), 1
        ids, mask = ids.to(device), mask.to(device)
        row_ix = torch.cat([torch.full((k,), r) for r, (_, k) in enumerate(where)]).to(device)  # (N,)
        pos_ix = torch.cat([torch.arange(first, first + k) for first, k in where]).to(device)  # (N,)
        logp = []
        for who in (BASE, name):
            with use_adapter(model, who):
                logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
            logp.append(F.log_softmax(logits[row_ix, pos_ix].float(), dim=-1))  # (N, V)
        p_base, p_adapter = logp
        total += float((p_base.exp() * (p_base - p_adapter)).sum())
        count += len(row_ix)
    return total / max(count, 1)


def compare(base: ProbeAnswers, adapter: ProbeAnswers, kl: float | None = None) -> dict:
    """retention (share of the base's right answers the adapter still gets right), its 95 % Wilson interval
    (low, high), the counts, and the KL."""
    base_right = sum(base.right)
    kept = sum(b and a for b, a in zip(base.right, adapter.right))
    return {"retention": kept / base_right if base_right else float("nan"), "kept": kept, "base_right": base_right,
            "retention_95": wilson_interval(kept, base_right), "probes": len(base.right), "probe_score": adapter.score,
            "kl": kl}


def retention_of(model, tokenizer, name: str, base: ProbeAnswers, probes: list[Probe], render, stop_ids: set[int],
                 max_new_tokens: int = MAX_NEW_TOKENS, batch_size: int = 32) -> tuple[dict, ProbeAnswers]:
    """(retention numbers of adapter `name` against the base's answers, the adapter's own answers)."""
    answers = ask(model, tokenizer, probes, name, render, stop_ids, max_new_tokens, batch_size)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop_ids)
    kl = kl_to_base(model, name, base, pad_id=pad)
    return compare(base, answers, kl), answers
