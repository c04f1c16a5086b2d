"""`make bench`: every bench/bench_*.py in its own process, then bench/results.json and bench/RESULTS.md.

Each script prints its markdown table and writes bench/results/<name>.json; this collects them, adds the machine
description, and concatenates the tables (the README's benchmark section is pasted from RESULTS.md).

    python bench/run.py [--smoke] [--only train,generate]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import common


def scripts(only: str | None) -> list:
    found = sorted(common.BENCH_DIR.glob("bench_*.py"))
    if only:
        wanted = set(only.split(","))
        found = [p for p in found if p.stem.removeprefix("bench_") in wanted]
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="every script's smoke mode (tiny models, seconds)")
    p.add_argument("--only", help="comma-separated names (train, generate, load, ...)")
    args = p.parse_args(argv)
    common.setup_path()
    machine = common.machine()
    collected, sections, failed, ran = {}, [], [], {}
    for script in scripts(args.only):
        name = script.stem.removeprefix("bench_")
        out = common.results_dir(args.smoke) / f"{name}.json"
        out.unlink(missing_ok=True)
        start = time.perf_counter()
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, str(script)] + (["--smoke"] if args.smoke else []), cwd=common.ROOT)
        seconds = time.perf_counter() - start
        if proc.returncode != 0 or not out.is_file():
            failed.append(name)
        ran[name] = {"seconds": round(seconds, 1), "returncode": proc.returncode}
        print(f"bench: {name} done in {seconds:.0f} s (exit {proc.returncode})", file=sys.stderr, flush=True)
    for script in scripts(None):  # with --only, the other scripts' latest results stay in the summary
        name = script.stem.removeprefix("bench_")
        out = common.results_dir(args.smoke) / f"{name}.json"
        if out.is_file():
            result = json.loads(out.read_text())
            collected[name] = {**result, **ran.get(name, {"rerun": False})}
            sections.append(result["markdown"])
    header = (f"# lorakit benchmarks{' (smoke)' if args.smoke else ''}\n\nMachine: "
              f"{common.describe_machine(machine)}.\n\n")
    where = common.results_dir(True) if args.smoke else common.BENCH_DIR
    where.mkdir(parents=True, exist_ok=True)
    (where / "RESULTS.md").write_text(header + "\n\n".join(sections) + "\n")
    (where / "results.json").write_text(json.dumps({"machine": machine, "smoke": args.smoke,
                                                               "benchmarks": collected}, indent=2) + "\n")
    print(f"bench: wrote {where / 'RESULTS.md'} and {where / 'results.json'}"
          + (f"; failed: {', '.join(failed)}" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
