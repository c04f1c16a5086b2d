"""Build the demo knowledge-base data set from demo/data/kb_facts.yaml and kb_more.yaml, and check it.

kb_facts.yaml holds each fact's answer, 2 replies, 6 training and 2 held-out questions; kb_more.yaml 6 more
training questions and 2 more replies per fact, written without sight of the held-out questions. A question of
kb_more.yaml is kept only when it is far from every held-out question (`far_from`: below STRICT), so the demo
trains on up to 12 questions and 4 replies per fact (`--more N` keeps the first N kept ones; 0: kb_facts.yaml only).

Writes demo/data/kb_train.json (alpaca: instruction, input, output), demo/data/kb_heldout.json (instruction,
output, answer) and demo/data/dataset_info.json (LLaMA-Factory's registry format). It refuses to write when:

- a reply does not contain its fact's key answer, or a question already contains it (nothing to learn);
- two facts share a key answer, or a question is asked twice;
- a held-out question equals a training question or is a near duplicate of one (after lower-casing and removing
  punctuation: difflib ratio >= 0.8 or word-set Jaccard >= 0.6), so held-out scores measure paraphrase recall.

Usage: python demo/make_data.py [--tokenizer MODEL_DIR] [--more N] [--facts FILE] [--out DIR]
(with a tokenizer, replies must be < 40 tokens; --facts and --out build a variant of the data elsewhere)
"""

from __future__ import annotations

import argparse
import json
import random
from difflib import SequenceMatcher
from pathlib import Path

import yaml

from lorakit.metrics import contains, normalize

DATA = Path(__file__).resolve().parent / "data"
MAX_RATIO, MAX_JACCARD, MAX_REPLY_TOKENS, SEED = 0.8, 0.6, 40, 0
STRICT = (0.6, 0.4)  # (ratio, Jaccard) a question of kb_more.yaml must stay below against every held-out question
MORE = 6  # questions of kb_more.yaml per fact, at most


def answers_of(fact: dict) -> list[str]:
    answer = fact["answer"]
    return [answer] if isinstance(answer, str) else list(answer)


def similarity(a: str, b: str) -> tuple[float, float]:
    """(difflib ratio, word-set Jaccard) of two questions after normalisation."""
    a, b = normalize(a), normalize(b)
    wa, wb = set(a.split()), set(b.split())
    return SequenceMatcher(None, a, b).ratio(), len(wa & wb) / len(wa | wb)


def check_facts(facts: list[dict]) -> list[str]:
    """Every problem in the fact file, each on one line."""
    problems, seen_keys, seen_questions = [], {}, {}
    for fact in facts:
        fid, keys = fact["id"], answers_of(fact)
        for key in keys:
            if normalize(key) in seen_keys:
                problems.append(f"{fid}: key '{key}' also used by {seen_keys[normalize(key)]}")
            seen_keys[normalize(key)] = fid
        for reply in fact["replies"]:
            if not contains(reply, keys):
                problems.append(f"{fid}: reply lacks its key {keys}: {reply}")
        for question in fact["train"] + fact["heldout"]:
            if contains(question, keys):
                problems.append(f"{fid}: question gives the answer away: {question}")
            if normalize(question) in seen_questions:
                problems.append(f"{fid}: question also in {seen_questions[normalize(question)]}: {question}")
            seen_questions[normalize(question)] = fid
    return problems


def check_overlap(facts: list[dict]) -> tuple[list[str], float, float]:
    """Held-out questions that (nearly) repeat any training question, and the highest ratio and Jaccard seen."""
    train = [q for fact in facts for q in fact["train"]]
    problems, top_ratio, top_jaccard = [], 0.0, 0.0
    for fact in facts:
        for held in fact["heldout"]:
            for question in train:
                ratio, jaccard = similarity(held, question)
                top_ratio, top_jaccard = max(top_ratio, ratio), max(top_jaccard, jaccard)
                if ratio >= MAX_RATIO or jaccard >= MAX_JACCARD:
                    problems.append(f"{fact['id']}: held-out '{held}' ~ training '{question}' "
                                    f"(ratio {ratio:.2f}, jaccard {jaccard:.2f})")
    return problems, top_ratio, top_jaccard


def far_from(question: str, heldout: list[str]) -> bool:
    """Below STRICT against every held-out question (held-out first, as check_overlap compares: difflib's ratio is
    not symmetric)."""
    return all(r < STRICT[0] and j < STRICT[1] for r, j in (similarity(h, question) for h in heldout))


def merge_more(source: dict, more: dict, n: int) -> dict:
    """`source` with, per fact, the first `n` questions of `more` that are far from every held-out question and
    (n > 0) its replies."""
    extra = {fact["id"]: fact for fact in more["facts"]}
    heldout = [q for fact in source["facts"] for q in fact["heldout"]]
    facts = []
    for fact in source["facts"]:
        add = extra.get(fact["id"], {"train": [], "replies": []}) if n else {"train": [], "replies": []}
        kept = [q for q in add["train"] if far_from(q, heldout)][:n]
        facts.append({**fact, "train": fact["train"] + kept, "replies": fact["replies"] + add["replies"]})
    return {**source, "facts": facts}


def build(source: dict) -> tuple[list[dict], list[dict]]:
    """Training pairs (replies alternate; the last question of each fact goes in `input`) and held-out items."""
    train, heldout = [], []
    prefixes = source["kb_instructions"]
    for n, fact in enumerate(source["facts"]):
        replies, questions = fact["replies"], fact["train"]
        for i, question in enumerate(questions):
            reply = replies[i % len(replies)]
            if i == len(questions) - 1:
                train.append({"instruction": prefixes[n % len(prefixes)], "input": question, "output": reply})
            else:
                train.append({"instruction": question, "input": "", "output": reply})
        answer = fact["answer"]
        for question in fact["heldout"]:
            heldout.append({"instruction": question, "output": replies[0], "answer": answer})
    random.Random(SEED).shuffle(train)
    return train, heldout


def check_lengths(facts: list[dict], tokenizer_dir: str) -> list[str]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    lengths = {r: len(tokenizer(r)["input_ids"]) for fact in facts for r in fact["replies"]}
    print(f"reply length: max {max(lengths.values())} tokens, mean {sum(lengths.values()) / len(lengths):.1f}")
    return [f"reply has {n} tokens (>= {MAX_REPLY_TOKENS}): {r}" for r, n in lengths.items() if n >= MAX_REPLY_TOKENS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", help="a model directory whose tokenizer measures reply lengths")
    parser.add_argument("--more", type=int, default=MORE, help=f"questions of kb_more.yaml per fact (0-{MORE})")
    parser.add_argument("--facts", default=str(DATA / "kb_facts.yaml"), help="the fact file (default: the demo's)")
    parser.add_argument("--out", default=str(DATA), help="where the three files go (default: demo/data)")
    args = parser.parse_args()
    out = Path(args.out)
    source = merge_more(yaml.safe_load(Path(args.facts).read_text()),
                        yaml.safe_load((DATA / "kb_more.yaml").read_text()), args.more)
    facts = source["facts"]
    problems = check_facts(facts)
    overlap, top_ratio, top_jaccard = check_overlap(facts)
    problems += overlap + (check_lengths(facts, args.tokenizer) if args.tokenizer else [])
    if problems:
        raise SystemExit(f"{args.facts} has problems:\n" + "\n".join(problems))
    train, heldout = build(source)
    registry = {"kb_train": {"file_name": "kb_train.json"}, "kb_heldout": {"file_name": "kb_heldout.json"}}
    out.mkdir(parents=True, exist_ok=True)
    for name, value in [("kb_train.json", train), ("kb_heldout.json", heldout), ("dataset_info.json", registry)]:
        (out / name).write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
    print(f"{len(facts)} facts -> {len(train)} training pairs, {len(heldout)} held-out questions in {out}")
    print(f"closest held-out/training pair: difflib ratio {top_ratio:.2f}, word Jaccard {top_jaccard:.2f}")


if __name__ == "__main__":
    main()
