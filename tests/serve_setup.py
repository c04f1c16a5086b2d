"""A real `lorakit serve` app on uvicorn, on 127.0.0.1 and an ephemeral port, in a thread of the test process."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import uvicorn

from lorakit.serve.api import Settings, create_app
from lorakit.serve.engine import Engine
from lorakit.serve.metrics import Metrics
from lorakit.serve.registry import Registry, open_registry
from lorakit.serve.scheduler import Limits


@dataclass
class Running:
    url: str  # http://127.0.0.1:PORT
    registry: Registry
    engine: Engine
    key: str | None = None

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def metric(self, name: str) -> float:
        """The value of an unlabelled metric from /metrics."""
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        for line in httpx.get(self.url + "/metrics", headers=headers).text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)

    def wait_for(self, name: str, value: float, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while self.metric(name) != value:
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} stayed {self.metric(name)}, expected {value}")
            time.sleep(0.02)


@contextlib.contextmanager
def serving(adapters: str | None, api_key: str | None = None, max_batch: int = 8, max_queue: int = 16,
            max_model_len: int = 256, runtime: bool = True, body: int = 64 * 1024) -> Iterator[Running]:
    registry = open_registry(adapters, None, None)
    metrics = Metrics()
    engine = Engine(registry, Limits(max_batch, max_batch * max_model_len, 4096), max_queue, metrics)
    app = create_app(engine, registry, metrics, Settings(api_key, max_model_len, body, runtime))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    running = Running(f"http://127.0.0.1:{sock.getsockname()[1]}", registry, engine, api_key)
    try:
        yield running
    finally:
        server.should_exit = True
        thread.join(10)
