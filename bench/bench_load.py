"""Time to load the default model (lorakit's cached conversion of the embedded GGUF) and an adapter onto it.

Each row is a fresh process: `import` seconds (torch, transformers, lorakit or PEFT), model load seconds, adapter
load seconds, and peak RSS. lorakit: `lorakit.models.load_model(None)` + `LoraModel.from_pretrained`; reference:
transformers' `AutoModelForCausalLM/AutoTokenizer.from_pretrained` on the same directory + PEFT's
`PeftModel.from_pretrained`. The GGUF conversion itself happens once per machine and is not timed here.

    python bench/bench_load.py [--smoke] [--repeats R]
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

import common  # noqa: E402

NAME = "load"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny model from a config, no download")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--row", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run(spec: dict, t_start: float) -> dict:
    import fixtures
    from transformers import AutoModelForCausalLM, AutoTokenizer  # both load through transformers

    smoke = spec["smoke"]
    path, adapter = fixtures.model_dir(smoke), fixtures.adapter_dirs(smoke)[0]
    if spec["impl"] == "lorakit":
        from lorakit import LoraModel
        from lorakit.models import load_model

        t_import = time.perf_counter()
        model, _, _ = load_model(str(path) if smoke else None, dtype="float32", device="cpu")
        t_model = time.perf_counter()
        LoraModel.from_pretrained(model, adapter)
    else:
        from peft import PeftModel

        t_import = time.perf_counter()
        AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype="float32", attn_implementation="sdpa").eval()
        t_model = time.perf_counter()
        PeftModel.from_pretrained(model, str(adapter))
    t_adapter = time.perf_counter()
    return {**spec, "import_s": t_import - t_start, "model_s": t_model - t_import, "adapter_s": t_adapter - t_model,
            "peak_rss_mb": common.peak_rss_mb()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.setup_path()
    if args.row:
        common.emit_row(run(json.loads(args.row), T_START))
        return 0
    import fixtures

    machine = common.machine()
    fixtures.adapter_dirs(args.smoke)
    results = []
    for rep in range(1 if args.smoke else args.repeats):
        for impl in ("lorakit", "peft") if rep % 2 == 0 else ("peft", "lorakit"):
            spec = {"smoke": args.smoke, "impl": impl, "repeat": rep}
            results.append(run(spec, time.perf_counter()) if args.smoke
                           else common.run_row(common.BENCH_DIR / "bench_load.py", spec))
    lines, rows = [], []
    for impl, label in (("lorakit", "lorakit"), ("peft", "transformers + PEFT")):
        ok = [r for r in results if r["impl"] == impl and "error" not in r]
        if not ok:
            lines.append([label, next(r["error"] for r in results if r["impl"] == impl)[:80], None, None, None])
            continue
        row = {k: common.median([r[k] for r in ok]) for k in ("import_s", "model_s", "adapter_s", "peak_rss_mb")}
        rows.append({"impl": impl, **row})
        lines.append([label, row["import_s"], row["model_s"], row["adapter_s"], row["peak_rss_mb"]])
    md = (f"### Loading: default model (cached) and one r=16 all-linear adapter, median of {len(results) // 2}\n\n"
          + common.table(["implementation", "imports (s)", "model (s)", "adapter (s)", "peak RSS (MB)"], lines)
          + f"\n\nMachine: {common.describe_machine(machine)}.")
    print(md)
    common.write_results(NAME, {"machine": machine, "rows": rows, "runs": results}, md, args.smoke)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
