"""`lorakit serve`: one base model and many adapters behind an OpenAI-compatible HTTP API, continuously batched.

    lorakit serve --adapter kb=saves/kb --adapter style=saves/style          # http://127.0.0.1:8000/v1
    lorakit serve infer.yaml --port 8001 --api-key KEY --max-batch 16
    API_HOST=0.0.0.0 API_PORT=8000 API_KEY=secret lorakit serve --adapter saves/kb   # llamafactory-cli api's names

Everything is checked (keys, adapter directories, base model, templates, the address) before the model loads.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
from dataclasses import dataclass

from ..dtypes import canonical_name
from .arguments import ConfigError, run_command, say
from .chat import model_problems

USAGE = """usage: lorakit serve [CONFIG.yaml] [KEY=VALUE ...] [--adapter NAME=DIR ...] [--model M] [--host H]
                     [--port P] [--api-key KEY] [--max-batch N] [--max-queue N] [--max-model-len N]
                     [--allow-runtime-adapters]

Serve the base model and every adapter through an OpenAI-compatible API (/v1/models, /v1/chat/completions,
/v1/completions; /v1/load_lora_adapter and /v1/unload_lora_adapter with --allow-runtime-adapters; /health,
/metrics). A request's `model` picks the adapter (the base id: none); requests for different adapters share one
batch and join it between decoding steps. host, port and api_key default to $API_HOST, $API_PORT, $API_KEY.
SIGTERM or Ctrl-C stops accepting, lets running answers finish for up to shutdown_timeout seconds, exits 0.

examples:
  lorakit serve --adapter kb=saves/kb --adapter style=saves/style
  lorakit serve infer.yaml --port 8001 --api-key secret --max-batch 16 --allow-runtime-adapters

"""

FLAGS = {"--adapter": "adapter_name_or_path", "--adapters": "adapter_name_or_path", "--model": "model_name_or_path",
         "--dtype": "infer_dtype"}
ALIASES = {k.removeprefix("--"): v for k, v in FLAGS.items()}


@dataclass
class ServeArgs:
    """Settings of `lorakit serve` (LLaMA-Factory's inference keys where they exist)."""

    model_name_or_path: str | None = None
    """Base model: a local HF directory, a GGUF file, a hub id in the local cache. Empty: the adapters' base
    (adapter_config.json / training_args.yaml), else the default SmolLM2-135M-Instruct."""
    adapter_name_or_path: str | None = None
    """Adapter directories: a comma list of DIR or NAME=DIR (--adapter, repeatable); NAME is the model id."""
    template: str | None = None
    """Chat template for every model id: empty uses each adapter's own (training_args.yaml), else the tokenizer's;
    or a built-in name (chatml, qwen, qwen3_nothink, llama3, mistral, alpaca, empty)."""
    finetuning_type: str = "lora"
    """lora (or qlora: the adapters run on the unquantized base); full / freeze: the model served as it is."""
    infer_backend: str = "huggingface"
    """Only huggingface (transformers) is supported."""
    infer_dtype: str = "float32"
    """Weights dtype: float32, bfloat16, float16, or auto (the checkpoint's own)."""
    device: str | None = None
    """cpu, cuda, cuda:1, ...; empty picks CUDA when present."""
    host: str | None = None
    """Address to listen on; empty: $API_HOST, else 127.0.0.1 (loopback only)."""
    port: int | None = None
    """Port; empty: $API_PORT, else 8000; 0 picks a free port (printed)."""
    api_key: str | None = None
    """Every endpoint but /health needs `Authorization: Bearer KEY`; empty: $API_KEY, else no key."""
    max_batch: int = 32
    """Most rows decoding together."""
    max_queue: int = 256
    """Most requests accepted and waiting for a row; one more is answered 429."""
    max_model_len: int | None = None
    """Most tokens of one request, prompt plus max_tokens (over it: 400); empty: the model's context length."""
    max_kv_tokens: int | None = None
    """KV-cache budget in tokens, all rows together (rows x the longest reservation); empty: max_batch x
    max_model_len. Requests that do not fit wait."""
    prefill_tokens: int = 4096
    """Most (padded) prompt tokens prefilled in one step."""
    allow_runtime_adapters: bool = False
    """Enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter."""
    max_body_bytes: int = 2 * 1024 * 1024
    """Largest request body accepted (over it: 413)."""
    shutdown_timeout: float = 10.0
    """On SIGTERM / Ctrl-C, seconds running answers may take to finish before they are cancelled."""

    def __post_init__(self) -> None:
        self.host = self.host or os.environ.get("API_HOST") or "127.0.0.1"
        self.api_key = self.api_key or os.environ.get("API_KEY") or None
        problems = []
        if self.port is None:
            env = os.environ.get("API_PORT", "8000")
            if not env.strip().isdigit():
                problems.append(f"API_PORT must be a port number, got {env!r}")
            self.port = int(env) if env.strip().isdigit() else 0
        if not 0 <= self.port <= 65535:
            problems.append(f"port must be in 0..65535, got {self.port}")
        problems += model_problems(self, "serves")
        for key in ("max_batch", "max_queue", "prefill_tokens", "max_body_bytes", "max_model_len", "max_kv_tokens"):
            value = getattr(self, key)
            if value is not None and value < 1:
                problems.append(f"{key} must be >= 1, got {value}")
        if self.shutdown_timeout < 0:
            problems.append(f"shutdown_timeout must be >= 0, got {self.shutdown_timeout}")
        if self.api_key is not None and not self.api_key.strip():
            problems.append("api_key must not be blank")
        if problems:
            raise ConfigError(problems)


def run_serve(argv: list[str]) -> int:
    """`lorakit serve`: exit status 0 after a clean stop (SIGTERM / Ctrl-C included), 1 bad input, 2 bad settings."""
    return run_command("serve", argv, ServeArgs, USAGE, FLAGS, ALIASES, serve)


def serve(args: ServeArgs) -> int:
    import uvicorn

    from ..serve.api import Settings, create_app
    from ..serve.engine import Engine
    from ..serve.metrics import Metrics
    from ..serve.registry import open_registry
    from ..serve.scheduler import Limits

    sock = listen(args.host, args.port)  # a taken port fails before the weights load
    dtype = canonical_name(args.infer_dtype)
    say("serve", f"loading {args.model_name_or_path or 'the base of the adapters (or the default model)'}")
    registry = open_registry(args.adapter_name_or_path, args.model_name_or_path, args.template, dtype, args.device)
    context = getattr(registry.model.config, "max_position_embeddings", None) or 2048
    max_len = args.max_model_len or context
    if max_len > context:
        raise ValueError(f"max_model_len {max_len} is over the model's context of {context} tokens")
    budget = args.max_kv_tokens or args.max_batch * max_len
    if budget < max_len:
        raise ValueError(f"max_kv_tokens {budget} is under max_model_len {max_len}: no long request could run")
    limits = Limits(args.max_batch, budget, args.prefill_tokens)
    metrics = Metrics()
    engine = Engine(registry, limits, args.max_queue, metrics)
    settings = Settings(args.api_key, max_len, args.max_body_bytes, args.allow_runtime_adapters)
    app = create_app(engine, registry, metrics, settings)
    host, port = sock.getsockname()[:2]
    report(args, registry, limits, max_len, f"http://{_url_host(host)}:{port}/v1")
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=args.shutdown_timeout)
    server = uvicorn.Server(config)
    # uvicorn handles SIGINT/SIGTERM while it serves and re-raises the signal after its graceful stop; a quiet
    # handler underneath turns that into a normal return (exit 0) instead of KeyboardInterrupt / death by SIGTERM
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    say("serve", "stopped")
    return 0


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (IPv4 or IPv6); a one-line error when the address cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    return sock


def report(args: ServeArgs, registry, limits, max_len: int, url: str) -> None:
    """Where it listens, the base, every adapter (rank, targets, template), the limits in force."""
    say("serve", f"listening on {url}")
    say("serve", f"model {registry.base.describe()}")
    for entry in registry.entries.values():
        say("serve", f"adapter {entry.describe()}")
    cfg = registry.model.config
    per_token = 2 * cfg.num_hidden_layers * getattr(cfg, "num_key_value_heads", cfg.num_attention_heads) * \
        getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads) * registry.model.dtype.itemsize
    say("serve", f"limits: max_batch {limits.max_batch}, max_queue {args.max_queue}, max_model_len {max_len}, "
                 f"KV budget {limits.kv_budget} tokens ({limits.kv_budget * per_token / 2**20:.0f} MiB), "
                 f"prefill {limits.prefill_tokens} tokens per step, body {args.max_body_bytes} bytes, "
                 f"runtime adapters {'on' if args.allow_runtime_adapters else 'off'}, "
                 f"API key {'required' if args.api_key else 'none'}")
    if not _loopback(args.host) and not args.api_key:
        say("serve", f"warning: listening on {args.host} (not loopback) without an API key: anyone who can reach "
                     f"this port can use it; set --api-key or API_KEY")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
