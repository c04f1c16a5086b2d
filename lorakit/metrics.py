"""Scores of generated answers against references: exact match, contains-the-answer, ROUGE-L F1."""

from __future__ import annotations

import re
import string

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed (the SQuAD-style normalisation)."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def contains(prediction: str, answers: str | list[str]) -> float:
    """1 if any acceptable answer appears in the prediction (case and punctuation insensitive)."""
    answers = [answers] if isinstance(answers, str) else answers
    pred = f" {normalize(prediction)} "
    return float(any(f" {normalize(a)} " in pred for a in answers if normalize(a)))


def _lcs(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence, O(len(a) * len(b)) time, O(len(b)) memory."""
    row = [0] * (len(b) + 1)
    for x in a:
        diag = 0
        for j, y in enumerate(b, start=1):
            diag, row[j] = row[j], diag + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over normalised word tokens."""
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    lcs = _lcs(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)
