"""Prometheus metrics of one server, under vLLM's names with an `effllm:` prefix.

Each app owns its registry (not prometheus-client's global one), so a process can build many apps (tests)
without duplicate-metric errors. Gauges are read from the engine when scraped; latencies are observed
by the async engine as requests stream.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# vLLM's buckets: TTFT spans a cached short prompt to a long queued one; TPOT a fast GPU to a slow CPU.
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
TPOT_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
E2E_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    """The server's metrics; `running`, `waiting` and `kv_usage` are read at scrape time."""

    def __init__(
        self,
        model_name: str,
        running: Callable[[], float],
        waiting: Callable[[], float],
        kv_usage: Callable[[], float],
        spec_decode: dict[str, Callable[[], float]] | None = None,
    ):
        self.registry = CollectorRegistry()
        labels = {"model_name": model_name}

        def gauge(name: str, doc: str, read: Callable[[], float]) -> None:
            g = Gauge(name, doc, list(labels), registry=self.registry)
            g.labels(**labels).set_function(read)

        gauge("effllm:num_requests_running", "Requests the engine is computing.", running)
        gauge("effllm:num_requests_waiting", "Requests queued for the engine.", waiting)
        gauge("effllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).", kv_usage)
        docs = {  # speculative decoding: totals since start (mean accepted length = 1 + accepted / verifications)
            "effllm:spec_decode_num_draft_tokens": "Draft tokens verified (speculative decoding).",
            "effllm:spec_decode_num_accepted_tokens": "Draft tokens the model accepted.",
            "effllm:spec_decode_num_verifications": "Request-steps that verified drafts.",
        }
        for name, read in (spec_decode or {}).items():
            gauge(name, docs.get(name, name), read)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, list(labels), buckets=buckets, registry=self.registry).labels(
                **labels
            )

        self.ttft = histogram(
            "effllm:time_to_first_token_seconds", "Time to the first output token.", TTFT_BUCKETS
        )
        self.tpot = histogram(
            "effllm:time_per_output_token_seconds", "Time between output tokens.", TPOT_BUCKETS
        )
        self.e2e = histogram(
            "effllm:e2e_request_latency_seconds", "Time from arrival to the last token.", E2E_BUCKETS
        )
        self.prompt_tokens = Counter(
            "effllm:prompt_tokens", "Prompt tokens processed.", list(labels), registry=self.registry
        ).labels(**labels)
        self.generation_tokens = Counter(
            "effllm:generation_tokens", "Output tokens generated.", list(labels), registry=self.registry
        ).labels(**labels)
        self._finished = Counter(
            "effllm:request_success",
            "Requests finished, by finish reason.",
            [*labels, "finished_reason"],
            registry=self.registry,
        )
        self._labels = labels

    def observe_finished(self, reason: str) -> None:
        self._finished.labels(**self._labels, finished_reason=reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
