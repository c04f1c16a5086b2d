"""An Estimate as text: the table `lorakit estimate` prints, its one-line summary (printed by `lorakit train`), and
the JSON object of `--json`."""

from __future__ import annotations

GIB = 2**30


def gib(n: float) -> str:
    return f"{n / GIB:,.2f} GiB" if n >= 0.1 * GIB else f"{n / 2**20:,.0f} MiB"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown (no FLOP peak for this device)"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def summary(est) -> str:
    """One line: model, method, device, peak, fit, tokens/s."""
    verdict = "fits" if est.fits else "DOES NOT FIT"
    speed = f", ~{est.tokens_per_s:,.0f} tokens/s" if est.tokens_per_s else ""
    epoch = f", epoch ~{duration(est.epoch_seconds)}" if est.epoch_seconds and est.data.measured else ""
    return (f"estimate: {est.method} ({est.precision}) of {est.model} on {est.device.name}: peak "
            f"{gib(est.peak_bytes)} of {gib(est.device.memory_bytes)}, {verdict}{speed}{epoch}")


def table(est) -> str:
    """The full report, as lines of text."""
    w = est.workload
    lines = [summary(est), "",
             f"model: {est.params:,d} parameters; trains {est.trained_params:,d} "
             f"({100 * est.trained_params / max(est.params, 1):.3f}%)",
             f"largest pass: {w.rows} x {w.width} tokens ({w.labels:,d} with loss)"
             + (", packed" if w.packed else ""), "",
             "| part | memory |", "|---|---|"]
    for name, value in est.parts.items():
        lines.append(f"| {name} | {gib(value)} |")
    lines.append(f"| **training peak** | **{gib(sum(est.parts.values()))}** |")
    lines.append(f"| while loading (fp32 on the device) | {gib(est.load_bytes)} |")
    lines.append(f"| **peak** | **{gib(est.peak_bytes)}** of {gib(est.device.memory_bytes)}: "
                 f"{'fits' if est.fits else 'does not fit'} |")
    lines += ["", "time:",
              f"  {est.flops_per_token / 1e9:,.2f} GFLOP per token, {est.flops_per_step / 1e12:,.3f} TFLOP per "
              f"optimizer step ({est.steps_per_epoch} steps per epoch)"]
    if est.tokens_per_s:
        eff = est.device.efficiency("bf16" if est.precision.startswith("bf16") else "fp32")
        what = (f"the model's matmul shapes at {est.epoch.typical_pass:,d} tokens per pass, timed now on this CPU"
                if est.device.measured_here else f"peak, {est.device.source}")
        lines.append(f"  {est.tokens_per_s:,.0f} tokens/s = {est.rate / 1e12:,.2f} TFLOP/s ({what}) x "
                     f"{eff:.0%} efficiency")
        what = "the data set" if est.data.measured else "one assumed step"
        lines.append(f"  one epoch of {what}: {duration(est.epoch_seconds)}; the run: {duration(est.run_seconds)}")
    if est.data.measured:
        d = est.data
        lines.append(f"data: {d.examples:,d} examples, {d.task_tokens:,d} tokens, {d.task_label_tokens:,d} with loss "
                     f"(tokenizer: {d.tokenizer})")
        if d.replay_rows:
            lines.append(f"replay: {d.replay_rows:,d} rows per epoch, {d.replay_tokens:,d} tokens, "
                         f"{d.replay_labels:,d} with loss; lengths from {d.replay_source}")
    if est.changes:
        lines += ["", "does not fit; what to change (seed 000's order), each planned again:"]
        for c in est.changes:
            lines.append(f"  - {c['change']}: peak {gib(c['peak_bytes'])} ({-c['saves_bytes'] / GIB:+,.2f} GiB)"
                         f"{', fits' if c['fits'] else ''}")
    if est.advice:
        lines += ["", "advice:"]
        lines += [f"  - {a['advice']} [{a['source']}]" for a in est.advice]
    if est.notes:
        lines += ["", "notes:"] + [f"  - {n}" for n in est.notes]
    return "\n".join(lines)


def as_json(est) -> dict:
    """The --json object: peak_bytes, parts, fits, tokens_per_s and the rest."""
    w = est.workload
    return {"model": est.model, "method": est.method, "precision": est.precision,
            "device": {"name": est.device.name, "kind": est.device.kind, "memory_bytes": est.device.memory_bytes,
                       "peak_flops": est.device.peak_flops, "source": est.device.source},
            "peak_bytes": int(est.peak_bytes), "fits": est.fits,
            "parts": {k: int(v) for k, v in est.parts.items()}, "load_bytes": int(est.load_bytes),
            "largest_pass": {"rows": w.rows, "width": w.width, "labels": w.labels, "packed": w.packed},
            "params": est.params, "trained_params": est.trained_params,
            "flops_per_token": est.flops_per_token, "flops_per_step": est.flops_per_step,
            "matmul_flops_per_s": est.rate, "typical_pass_tokens": est.epoch.typical_pass,
            "tokens_per_s": est.tokens_per_s, "epoch_seconds": est.epoch_seconds, "run_seconds": est.run_seconds,
            "steps_per_epoch": est.steps_per_epoch,
            "data": {"measured": est.data.measured, "examples": est.data.examples, "tokens": est.data.task_tokens,
                     "label_tokens": est.data.task_label_tokens, "tokenizer": est.data.tokenizer,
                     "replay_rows": est.data.replay_rows, "replay_tokens": est.data.replay_tokens,
                     "replay_label_tokens": est.data.replay_labels, "replay_source": est.data.replay_source},
            "changes": [{**c, "peak_bytes": int(c["peak_bytes"]), "saves_bytes": int(c["saves_bytes"])}
                        for c in est.changes],
            "advice": est.advice, "notes": est.notes}
