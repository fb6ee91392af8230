"""The server's Prometheus metrics (prometheus-client, one registry per server)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("skiptree_requests", "HTTP generation requests by endpoint and status",
                                ("endpoint", "status"), registry=r)  # fmt: skip
        self.prompt_tokens = Counter(
            "skiptree_prompt_tokens", "Prompt tokens of finished requests", registry=r
        )
        self.generated_tokens = Counter("skiptree_generated_tokens", "Tokens generated", registry=r)
        self.target_steps = Counter("skiptree_target_steps", "Batched verify calls (one per decode step)",
                                    registry=r)  # fmt: skip
        self.row_steps = Counter("skiptree_row_steps", "Request rows verified, summed over steps", registry=r)
        self.tokens_per_row_step = Gauge("skiptree_tokens_per_target_step",
                                         "Tokens emitted per request per target step (last step)",
                                         registry=r)  # fmt: skip
        self.tree_tokens = Histogram("skiptree_tree_tokens", "Tokens per row of each verify call (1: plain)",
                                     buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64), registry=r)  # fmt: skip
        self.queue_length = Gauge("skiptree_queue_length", "Requests waiting for a row", registry=r)
        self.active = Gauge("skiptree_active_requests", "Requests holding a row", registry=r)
        self.time_to_first_token = Histogram("skiptree_time_to_first_token_seconds", "Arrival to first token",
                                             buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.request_seconds = Histogram("skiptree_request_seconds", "Arrival to finish",
                                         buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip

    def observe_step(self, stats, waiting: int, active: int) -> None:
        self.queue_length.set(waiting)
        self.active.set(active)
        if stats.rows:
            self.target_steps.inc()
            self.row_steps.inc(stats.rows)
            self.tree_tokens.observe(stats.tokens_per_row)
            self.tokens_per_row_step.set(stats.emitted / stats.rows)

    def text(self) -> bytes:
        return generate_latest(self.registry)
