"""Metrics: what `GET /metrics` reports, in Prometheus' text format (prometheus_client, one registry per server,
nothing global): requests by adapter and status, tokens in and out, queue length, running batch size, time to
first token and the time between tokens."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lorakit_requests", "Requests answered, by model id and HTTP status",
                                ["model", "status"], registry=r)
        self.prompt_tokens = Counter("lorakit_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generated_tokens = Counter("lorakit_generation_tokens", "Tokens generated", registry=r)
        self.decode_steps = Counter("lorakit_decode_steps", "Decode forwards (tokens out / steps: mean batch size)",
                                    registry=r)
        self.queue = Gauge("lorakit_queue_length", "Requests accepted and waiting for a batch row", registry=r)
        self.running = Gauge("lorakit_running_batch_size", "Rows in the running batch", registry=r)
        self.ttft = Histogram("lorakit_time_to_first_token_seconds", "From arrival to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("lorakit_inter_token_latency_seconds", "Between two tokens of one answer",
                             buckets=LATENCY_BUCKETS, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
