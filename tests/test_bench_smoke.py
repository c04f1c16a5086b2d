"""`bench/run.py --smoke` runs every bench script's smoke mode (tiny models, no download) and collects the tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_bench_script_runs_in_smoke_mode(tmp_path):
    env = {**os.environ, "LORAKIT_BENCH_OUT": str(tmp_path / "results"), "LORAKIT_HOME": str(tmp_path / "home"),
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scripts = sorted(p.stem.removeprefix("bench_") for p in (ROOT / "bench").glob("bench_*.py"))
    collected = json.loads((tmp_path / "results" / "results.json").read_text())
    assert collected["smoke"] and sorted(collected["benchmarks"]) == scripts
    markdown = (tmp_path / "results" / "RESULTS.md").read_text()
    assert "Machine:" in markdown and markdown.count("|---") >= len(scripts)
    train = json.loads((tmp_path / "results" / "train.json").read_text())
    for row in train["rows"]:
        assert row["tokens_per_s"] > 0 and row["peak_rss_mb"] > 0
    lorakit = {r["precision"]: r for r in train["rows"] if r["impl"] == "lorakit"}
    for precision, row in lorakit.items():  # same data, same start: the same loss after the same steps
        assert abs(row["eval_loss_diff"]) < 0.02, precision
