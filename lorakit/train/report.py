"""What a run reports: metrics.jsonl (one JSON object per logged step or evaluation) and the loss-curve PNGs."""

from __future__ import annotations

import json
from pathlib import Path

METRICS_NAME = "metrics.jsonl"
LOSS_PLOT = "training_loss.png"
EVAL_PLOT = "training_eval_loss.png"


class MetricsLog:
    """Appends records to output_dir/metrics.jsonl.

    A fresh run starts the file empty; a resumed run keeps the records up to the step it resumes from, so the
    file reads as if the run had never stopped.
    """

    def __init__(self, output_dir: str | Path, resume_step: int | None = None) -> None:
        self.path = Path(output_dir) / METRICS_NAME
        kept = []
        if resume_step is not None and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")



def read_metrics(output_dir: str | Path) -> list[dict]:
    """The records of output_dir/metrics.jsonl ([] when there is none)."""
    path = Path(output_dir) / METRICS_NAME
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(output_dir: str | Path) -> list[Path]:
    """training_loss.png (train loss by step) and, when there were evaluations, training_eval_loss.png."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never opens a window
    import matplotlib.pyplot as plt

    output_dir = Path(output_dir)
    rows = read_metrics(output_dir)
    written = []
    for key, name, title in (("loss", LOSS_PLOT, "training loss"), ("eval_loss", EVAL_PLOT, "evaluation loss")):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o" if len(points) < 30 else None, label=key)
        if key == "loss" and len(points) >= 10:
            ax.plot(steps, _smooth(list(values)), label="smoothed")
            ax.legend()
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.set_title(f"{title}: {output_dir.name}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(output_dir / name)
        plt.close(fig)
        written.append(output_dir / name)
    return written


def _smooth(values: list[float], weight: float = 0.8) -> list[float]:
    """Exponential moving average with bias correction, as TensorBoard draws it."""
    out, last = [], 0.0
    for i, v in enumerate(values, start=1):
        last = weight * last + (1 - weight) * v
        out.append(last / (1 - weight**i))
    return out


def human(n: float) -> str:
    """1234567 -> "1.23M"."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.4g}"
