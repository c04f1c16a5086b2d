"""Variants of the demo's knowledge-base training data for bench/retention_levers.py, built from its sources.

    base6           demo/data/kb_facts.yaml alone: 6 questions and 2 replies per fact (360 pairs), the demo's data
                    until 2026-12-01 and what every lever before the first div row trained on
    div10 / div12   with the first 4 / 6 kept questions and the 2 replies of demo/data/kb_more.yaml: 10 / 12
                    questions and 4 replies per fact (599 / 681 pairs; div12 is today's demo/data/kb_train.json)
    rep5            base6 five times over (1800 pairs): one epoch of it is five epochs of base6 with five times as
                    many distinct replay rows (replay_ratio draws from the pool once per run)

demo/make_data.py builds each (`merge_more`, `build`) and checks it as it checks the demo's data; the held-out
paraphrases are the demo's in every variant. A variant is written to `root/<name>/` as a data directory
(kb_train.json + dataset_info.json) that `dataset_dir` can name.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml
from common import ROOT

MORE = {"base6": 0, "div10": 4, "div12": 6}  # questions of kb_more.yaml per fact
VARIANTS = (*MORE, "rep5")


def make_data():
    if str(ROOT / "demo") not in sys.path:
        sys.path.insert(0, str(ROOT / "demo"))
    import make_data  # demo/make_data.py: the demo data's own builder and checks

    return make_data


def training_pairs(more: int) -> list[dict]:
    """The alpaca records of kb_facts.yaml with `more` questions per fact of kb_more.yaml, checked."""
    md = make_data()
    source = md.merge_more(yaml.safe_load((md.DATA / "kb_facts.yaml").read_text()),
                           yaml.safe_load((md.DATA / "kb_more.yaml").read_text()), more)
    problems = md.check_facts(source["facts"]) + md.check_overlap(source["facts"])[0]
    if problems:
        raise SystemExit("kb_facts.yaml + kb_more.yaml: " + "; ".join(problems))
    return md.build(source)[0]


def build(name: str, root: Path) -> Path:
    """Write variant `name` under root/name and return that directory."""
    if name not in VARIANTS:
        raise SystemExit(f"unknown KB variant {name!r}; choose from {', '.join(VARIANTS)}")
    train = training_pairs(0) * 5 if name == "rep5" else training_pairs(MORE[name])
    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "kb_train.json").write_text(json.dumps(train, indent=1, ensure_ascii=False) + "\n")
    (out / "dataset_info.json").write_text(json.dumps({"kb_train": {"file_name": "kb_train.json"}}) + "\n")
    return out
