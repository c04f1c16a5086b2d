"""Serving: C concurrent streaming `openai` clients against four servers, greedy, 64 new tokens per request.

Servers, each in its own process (its peak RSS is its own): `lorakit serve` with 8 adapters, the requests spread
over all 8 (mixed); the same server with every request on one adapter (the cost of mixing); a by-hand server on
transformers + PEFT answering one request at a time with `set_adapter` (what a user writes today); `transformers
serve --continuous-batching` (paged attention) on one adapter merged into the base (it cannot serve several).
The default model with eight r=16 all-linear adapters (bench/fixtures.py). Each client sends its requests one after
another (8 / C each, at least 1); tokens/s is all answers' tokens over the wall time of the run; time to first
token (TTFT) and inter-token latency (ITL, between content chunks) are per request.

    python bench/bench_serve.py [--smoke] [--clients 1,4,16,32] [--new-tokens 64]
    python bench/peft_server.py --model DIR --adapter a0=DIR ...   (the by-hand server alone)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import common

NAME = "serve"
SERVERS = ("lorakit-mixed", "lorakit-one", "peft-by-hand", "transformers-serve-cb")
LABELS = {"lorakit-mixed": "lorakit serve, 8 adapters mixed", "lorakit-one": "lorakit serve, all on one adapter",
          "peft-by-hand": "by hand: transformers + PEFT, one at a time",
          "transformers-serve-cb": "transformers serve --continuous-batching, 1 merged adapter"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny model, 2 adapters' worth of rows, a few tokens")
    p.add_argument("--clients", default="1,4,16,32")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--only", help="comma list of servers: " + ",".join(SERVERS))
    return p.parse_args(argv)


# ---------------------------------------------------------------- servers as subprocesses


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(kind: str, model_dir: Path, adapters: list[Path], merged: Path | None,
          smoke: bool) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_VERBOSITY": "error"}
    specs = [f"a{i}={d}" for i, d in enumerate(adapters)]
    if kind.startswith("lorakit"):
        cmd = [sys.executable, "-m", "lorakit", "serve", "--model", str(model_dir), "--adapter", ",".join(specs),
               "--port", "0", "--max-batch", "32"] + (["template=chatml"] if smoke else [])
    elif kind == "peft-by-hand":
        cmd = [sys.executable, str(common.BENCH_DIR / "peft_server.py"), "--model", str(model_dir)]
        cmd += [x for s in specs for x in ("--adapter", s)] + (["--chatml"] if smoke else [])
    else:
        port = free_port()
        cmd = [str(Path(sys.executable).parent / "transformers"), "serve", "--continuous-batching", "--device", "cpu",
               "--dtype", "float32", "--port", str(port), "--host", "127.0.0.1", str(merged)]
    proc = subprocess.Popen(cmd, cwd=common.ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True)
    if kind == "transformers-serve-cb":
        url = f"http://127.0.0.1:{port}/v1"
        threading.Thread(target=proc.stderr.read, daemon=True).start()
        wait_healthy(url.removesuffix("/v1") + "/health", proc)
        return proc, url
    seen = []
    for line in proc.stderr:
        seen.append(line.strip())
        if "listening on" in line:
            url = line.split("listening on ", 1)[1].strip()
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
            wait_healthy(url.removesuffix("/v1") + "/health", proc)
            return proc, url
    raise RuntimeError(f"{kind}: the server exited ({proc.wait()}) before listening: {' | '.join(seen[-2:])}")


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer in {timeout} s")


def peak_rss_mb(pid: int) -> float | None:
    """VmHWM of a process (and its children are not counted), in MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------- the clients


async def one_request(client, model: str, question: str, new_tokens: int, extra: dict) -> dict:
    sent = time.perf_counter()
    times, tokens = [], None
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=new_tokens, temperature=0,
        stream=True, **extra)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.perf_counter())
        if getattr(chunk, "usage", None):
            tokens = chunk.usage.completion_tokens
    return {"ttft": times[0] - sent if times else None, "gaps": [b - a for a, b in zip(times, times[1:])],
            "tokens": tokens if tokens is not None else len(times)}


async def load(url: str, kind: str, models: list[str], questions: list[str], clients: int, new_tokens: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=1800)
    per_client = max(1, 8 // clients)
    extra = {} if kind == "transformers-serve-cb" else {"extra_body": {"ignore_eos": True}}
    if kind.startswith("lorakit"):
        extra["stream_options"] = {"include_usage": True}

    async def worker(c: int) -> list[dict]:
        out = []
        for k in range(per_client):
            i = c * per_client + k
            out.append(await one_request(client, models[i % len(models)], questions[i % len(questions)],
                                         new_tokens, extra))
        return out

    start_at = time.perf_counter()
    results = [r for rs in await asyncio.gather(*(worker(c) for c in range(clients))) for r in rs]
    wall = time.perf_counter() - start_at
    await client.close()
    ttfts = sorted(r["ttft"] for r in results if r["ttft"] is not None)
    gaps = [g for r in results for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "ttft_p50_s": statistics.median(ttfts) if ttfts else None,
            "ttft_p99_s": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))] if ttfts else None,
            "itl_p50_s": statistics.median(gaps) if gaps else None}


def questions(smoke: bool) -> list[str]:
    if smoke:
        return ["What is the VPN address?", "Say some digits."]
    return [r["instruction"] for r in json.loads((common.ROOT / "demo/data/kb_heldout.json").read_text())[:32]]


def merged_model(model_dir: Path, adapter: Path) -> Path:
    """Adapter a0 merged into the base, saved once under the bench cache (for transformers serve)."""
    out = common.cache_dir() / "merged-a0"
    if (out / "config.json").is_file():
        return out
    from lorakit import LoraModel
    from lorakit.models import load_model

    model, tokenizer, _ = load_model(str(model_dir), dtype="float32", device="cpu")
    plain = LoraModel.from_pretrained(model, adapter).merge_and_unload()
    tmp = out.with_name(out.name + ".tmp")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out


def run_server(kind: str, model_dir: Path, adapters: list[Path], merged: Path | None, counts: list[int],
               new_tokens: int, smoke: bool) -> list[dict]:
    models = [f"a{i}" for i in range(len(adapters))] if kind != "lorakit-one" else ["a0"]
    if kind == "transformers-serve-cb":
        models = [str(merged)]
    try:
        proc, url = start(kind, model_dir, adapters, merged, smoke)
    except Exception as exc:
        return [{"server": kind, "clients": c, "error": str(exc)[:300]} for c in counts]
    rows = []
    try:
        try:
            asyncio.run(load(url, kind, models, questions(smoke), 1, 4))  # warm-up
        except Exception as exc:
            return [{"server": kind, "clients": c, "error": f"warm-up: {type(exc).__name__}: {str(exc)[:300]}"}
                    for c in counts]
        for c in counts:
            try:
                row = asyncio.run(load(url, kind, models, questions(smoke), c, new_tokens))
            except Exception as exc:
                row = {"clients": c, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            rows.append({"server": kind, **row})
            print(f"  {kind} C={c}: " + (row.get("error") or f"{row['tokens_per_s']:.1f} tok/s, TTFT p50 "
                                          f"{row['ttft_p50_s']} s"), file=sys.stderr, flush=True)
        rss = peak_rss_mb(proc.pid)
        for row in rows:
            row["peak_rss_mb"] = rss
    finally:
        stop(proc)
    return rows


def summarise(rows: list[dict], counts: list[int], new_tokens: int) -> tuple[str, dict]:
    got = {(r["server"], r["clients"]): r for r in rows}
    lines = []
    for kind in SERVERS:
        for c in counts:
            r = got.get((kind, c))
            if r is None:
                continue
            if "error" in r:
                lines.append([LABELS[kind], c, r["error"][:80], None, None, None, None])
                continue
            lines.append([LABELS[kind], c, r["tokens_per_s"], r["ttft_p50_s"], r["ttft_p99_s"],
                          r["itl_p50_s"] * 1000 if r["itl_p50_s"] else None, r.get("peak_rss_mb")])
    table = common.table(["server", "clients", "tokens/s", "TTFT p50 s", "TTFT p99 s", "ITL p50 ms",
                          "peak RSS MB"], lines)

    def tps(kind: str, c: int):
        return got.get((kind, c), {}).get("tokens_per_s")

    c = 16 if 16 in counts else counts[-1]
    mixed = tps("lorakit-mixed", c)
    ratios = {f"mixed_vs_{k}_at_{c}": (mixed / tps(k, c) if mixed and tps(k, c) else None) for k in SERVERS[1:]}
    return table, ratios


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.setup_path()
    import fixtures

    machine = common.machine()
    model_dir = fixtures.model_dir(args.smoke)
    adapters = fixtures.adapter_dirs(args.smoke)
    counts = [2] if args.smoke else [int(c) for c in args.clients.split(",")]
    new_tokens = 4 if args.smoke else args.new_tokens
    kinds = args.only.split(",") if args.only else list(SERVERS)
    if args.smoke:  # seconds: one lorakit server and the by-hand one
        kinds = [k for k in kinds if k in ("lorakit-mixed", "peft-by-hand")]
    merged = merged_model(model_dir, adapters[0]) if "transformers-serve-cb" in kinds else None
    rows = []
    for kind in kinds:
        rows += run_server(kind, model_dir, adapters, merged, counts, new_tokens, args.smoke)
    table, ratios = summarise(rows, counts, new_tokens)
    md = (f"### Serving: {len(adapters)} adapters r=16, C concurrent streaming clients, {new_tokens} new tokens, "
          f"greedy, fp32\n\n{table}\n\nMachine: {common.describe_machine(machine)}.")
    print(md)
    common.write_results(NAME, {"machine": machine, "ratios": ratios, "rows": rows}, md, args.smoke)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
