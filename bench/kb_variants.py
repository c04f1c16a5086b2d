"""Variants of the demo's knowledge-base training data for bench/retention_levers.py, built from the sources.

    div10 / div12   every fact with 4 / 6 more training questions and 2 more replies (bench/kb_extra.yaml): 10 / 12
                    questions and 4 replies per fact instead of 6 and 2 (599 / 681 pairs instead of 360)
    rep5            demo/data/kb_train.json five times over (1800 pairs): one epoch of it is five demo epochs with
                    five times as many distinct replay rows (replay_ratio draws from the pool once per run)

The held-out paraphrases (demo/data/kb_heldout.json) are the demo's in every variant. A new question is kept only
when it is farther from every held-out question than STRICT (difflib ratio, word Jaccard, as demo/make_data.py
measures them), and the built data passes make_data.py's own checks. A variant is written to `root/<name>/` as a
data directory (kb_train.json + dataset_info.json) that `dataset_dir` can name.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import yaml
from common import ROOT

EXTRA = Path(__file__).resolve().parent / "kb_extra.yaml"
STRICT = (0.6, 0.4)  # a new question at or above either (ratio, Jaccard) to a held-out question is dropped
MORE_QUESTIONS = {"div10": 4, "div12": 6}
VARIANTS = (*MORE_QUESTIONS, "rep5")


def make_data():
    sys.path.insert(0, str(ROOT / "demo"))
    import make_data  # demo/make_data.py: the demo data's own builder and checks

    return make_data


def far_from(question: str, heldout: list[str], similarity) -> bool:
    """Below STRICT against every held-out question (held-out first, as make_data.py compares: difflib's ratio is
    not symmetric)."""
    return all(r < STRICT[0] and j < STRICT[1] for r, j in (similarity(h, question) for h in heldout))


def extended_facts(n_questions: int) -> dict:
    """kb_facts.yaml with the first `n_questions` kept new questions and both new replies of every fact."""
    md = make_data()
    source = yaml.safe_load((md.DATA / "kb_facts.yaml").read_text())
    extra = {f["id"]: f for f in yaml.safe_load(EXTRA.read_text())["facts"]}
    heldout = [q for fact in source["facts"] for q in fact["heldout"]]
    out = copy.deepcopy(source)
    for fact in out["facts"]:
        more = extra[fact["id"]]
        kept = [q for q in more["train"] if far_from(q, heldout, md.similarity)]
        fact["train"] += kept[:n_questions]
        fact["replies"] += more["replies"]
    problems = md.check_facts(out["facts"]) + md.check_overlap(out["facts"])[0]
    if problems:
        raise SystemExit(f"{EXTRA}: " + "; ".join(problems))
    return out


def build(name: str, root: Path) -> Path:
    """Write variant `name` under root/name and return that directory."""
    if name not in VARIANTS:
        raise SystemExit(f"unknown KB variant {name!r}; choose from {', '.join(VARIANTS)}")
    md = make_data()
    if name == "rep5":
        train = json.loads((md.DATA / "kb_train.json").read_text()) * 5
    else:
        train, _ = md.build(extended_facts(MORE_QUESTIONS[name]))
    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "kb_train.json").write_text(json.dumps(train, indent=1, ensure_ascii=False) + "\n")
    (out / "dataset_info.json").write_text(json.dumps({"kb_train": {"file_name": "kb_train.json"}}) + "\n")
    return out
