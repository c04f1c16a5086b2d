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
    times, tokens, prompt = [], None, None
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=new_tokens, temperature=0,
        stream=True, **extra)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.perf_counter())
        if getattr(chunk, "usage", None):
            tokens, prompt = chunk.usage.completion_tokens, chunk.usage.prompt_tokens
    tokens = tokens if tokens is not None else len(times)
    # TPOT: (last chunk - first chunk) / (tokens - 1), per token whatever the server's chunking (the by-hand
    # server's streamer sends words, not tokens)
    tpot = (times[-1] - times[0]) / (tokens - 1) if len(times) > 1 and tokens > 1 else None
    return {"ttft": times[0] - sent if times else None, "gaps": [b - a for a, b in zip(times, times[1:])],
            "tokens": tokens, "tpot": tpot, "prompt_tokens": prompt}


async def load(url: str, kind: str, models: list[str], questions: list[str], clients: int, new_tokens: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=1800)
    per_client = max(1, 8 // clients)
    if kind == "transformers-serve-cb":  # no ignore_eos there: a request's eos_token_id -1 disables EOS (and it
        # sends usage unasked); every server then writes exactly new_tokens per answer
        extra = {"extra_body": {"generation_config": json.dumps({"eos_token_id": -1})}}
    else:
        extra = {"extra_body": {"ignore_eos": True}, "stream_options": {"include_usage": True}}

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
    tpots = [r["tpot"] for r in results if r["tpot"] is not None]
    prompts = [r["prompt_tokens"] for r in results if r["prompt_tokens"] is not None]
    return {"clients": clients, "requests": len(results), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "tokens_per_request": tokens / len(results),
            "ttft_p50_s": statistics.median(ttfts) if ttfts else None,
            "ttft_p99_s": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))] if ttfts else None,
            "itl_p50_s": statistics.median(gaps) if gaps else None,
            "tpot_p50_s": statistics.median(tpots) if tpots else None,
            "prompt_tokens_mean": statistics.mean(prompts) if prompts else None}


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


# ---------------------------------------------------------------- how far a decode step is from the machine


def machine_peaks(smoke: bool) -> dict:
    """This process's memory and matmul peaks (its own thread count): read GB/s = bytes / s of `x.sum()` over a
    large fp32 tensor, copy GB/s = 2 x bytes / s of `y.copy_(x)` (read + write), best of 5 each; GFLOP/s of a
    square matmul (2048^3) in fp32 and bf16 and of the decode step's skinny shape (16 x 576 x 1536) in fp32."""
    import torch

    n = (1 << 18) if smoke else (512 << 20) // 4  # 512 MiB of fp32: far past every cache
    x, y = torch.ones(n), torch.empty(n)

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(5):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    size = 64 if smoke else 2048
    return {"read_gb_s": 4 * n / best(x.sum) / 1e9, "copy_gb_s": 2 * 4 * n / best(lambda: y.copy_(x)) / 1e9,
            "gemm_fp32_gflops": common.gemm_peak([(size, size, size)], torch.float32),
            "gemm_bf16_gflops": common.gemm_peak([(size, size, size)], torch.bfloat16),
            "gemm_decode_fp32_gflops": common.gemm_peak([(16, 576, 1536)], torch.float32)}


def decode_step(kind: str, row: dict, model_dir: Path, adapters: list[Path], new_tokens: int) -> dict:
    """Bytes read and flops of one decoding step (an estimate from the files and the config, fp32):

    bytes = W (every weight file, the tied head read once) + n_a * A (the adapter files the step reads: lorakit
            reads each adapter of the batch once, the mixed run's rows spread over min(rows, 8) of them; PEFT the
            active one; merged none) + rows * ctx * L * 2 * kv_heads * head_dim * 4   (KV cache, ctx = prompt + new / 2)
    flops = 2 * rows * (P + m * P_a) + rows * L * 4 * heads * head_dim * ctx      (P: weights, P_a: one adapter;
            m = 1: each row multiplies its own adapter only, 0 merged)
    """
    cfg = json.loads((model_dir / "config.json").read_text())
    weights = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    one_adapter = (adapters[0] / "adapter_model.safetensors").stat().st_size
    rows = 1 if kind == "peft-by-hand" else row["clients"]
    n_a = {"peft-by-hand": 1, "transformers-serve-cb": 0, "lorakit-one": 1}.get(kind, min(rows, len(adapters)))
    m = 0 if kind == "transformers-serve-cb" else 1
    layers, heads, kv, hd = (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
                             cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    ctx = (row.get("prompt_tokens_mean") or 0) + new_tokens / 2
    kv_bytes = rows * ctx * layers * 2 * kv * hd * 4
    read = weights + n_a * one_adapter + kv_bytes
    flops = 2 * rows * (weights + m * one_adapter) / 4 + rows * layers * 4 * heads * hd * ctx
    return {"rows": rows, "adapters_read": n_a, "mb_read": read / 1e6, "kv_mb": kv_bytes / 1e6,
            "gflop": flops / 1e9}


def analyse(rows: list[dict], peaks: dict, model_dir: Path, adapters: list[Path], new_tokens: int) -> str:
    """Per measured row: the step's bytes and flops against its measured time (TPOT p50), the floor that the read
    bandwidth sets, and the share of the decode-shape GEMM peak reached."""
    lines = []
    for r in rows:
        if "error" in r or not r.get("tpot_p50_s"):
            continue
        est = decode_step(r["server"], r, model_dir, adapters, new_tokens)
        step = r["tpot_p50_s"]
        r["decode_step"] = {**est, "step_ms": step * 1000, "achieved_gb_s": est["mb_read"] / 1e3 / step,
                            "floor_ms": est["mb_read"] / 1e3 / peaks["read_gb_s"] * 1000,
                            "achieved_gflops": est["gflop"] / step}
        d = r["decode_step"]
        lines.append([LABELS[r["server"]], r["clients"], d["rows"], d["mb_read"], d["kv_mb"], d["step_ms"],
                      d["floor_ms"], d["achieved_gb_s"], d["gflop"], d["achieved_gflops"],
                      f"{100 * d['achieved_gflops'] / peaks['gemm_decode_fp32_gflops']:.0f}%"])
    head = (f"Peaks measured in this run ({common.torch_threads()} thread): read {peaks['read_gb_s']:.1f} GB/s, "
            f"copy {peaks['copy_gb_s']:.1f} GB/s; GEMM fp32 {peaks['gemm_fp32_gflops']:.0f} GFLOP/s "
            f"(2048^3), bf16 {peaks['gemm_bf16_gflops']:.0f}, fp32 at the decode shape 16x576x1536 "
            f"{peaks['gemm_decode_fp32_gflops']:.0f}.\n\nEstimate per decode step (bytes and flops from the files "
            f"and the config; step time = TPOT p50):\n\n")
    return head + common.table(["server", "clients", "rows/step", "MB read/step", "of which KV MB", "step ms",
                                "floor ms at read GB/s", "GB/s reached", "GFLOP/step", "GFLOP/s",
                                "of decode-shape peak"], lines)


def summarise(rows: list[dict], counts: list[int], new_tokens: int) -> tuple[str, dict]:
    got = {(r["server"], r["clients"]): r for r in rows}
    lines = []
    for kind in SERVERS:
        for c in counts:
            r = got.get((kind, c))
            if r is None:
                continue
            if "error" in r:
                lines.append([LABELS[kind], c, r["error"][:80], None, None, None, None, None, None])
                continue
            ms = [r[k] * 1000 if r.get(k) else None for k in ("itl_p50_s", "tpot_p50_s")]
            lines.append([LABELS[kind], c, r["tokens_per_s"], r["tokens_per_request"], r["ttft_p50_s"],
                          r["ttft_p99_s"], *ms, r.get("peak_rss_mb")])
    table = common.table(["server", "clients", "tokens/s", "tokens/request", "TTFT p50 s", "TTFT p99 s",
                          "ITL p50 ms", "TPOT p50 ms", "peak RSS MB"], lines)

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
    peaks = machine_peaks(args.smoke)  # before any server starts, in this process (its thread count)
    rows = []
    for kind in kinds:
        rows += run_server(kind, model_dir, adapters, merged, counts, new_tokens, args.smoke)
    table, ratios = summarise(rows, counts, new_tokens)
    steps = analyse(rows, peaks, model_dir, adapters, new_tokens)
    md = (f"### Serving: {len(adapters)} adapters r=16, C concurrent streaming clients, {new_tokens} new tokens, "
          f"greedy, fp32, {common.torch_threads()} torch thread(s) per process\n\n{table}\n\n"
          f"ITL: between content chunks; TPOT: per request, (last chunk - first) / (tokens - 1). "
          f"Machine: {common.describe_machine(machine)}.\n\n{steps}")
    print(md)
    common.write_results(NAME, {"machine": machine, "peaks": peaks, "ratios": ratios, "rows": rows}, md,
                         args.smoke)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
