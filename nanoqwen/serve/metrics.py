"""Server metrics in the Prometheus text format (no client library: a few counters, gauges and histograms).

The engine thread writes them and /metrics reads them on the event loop, so every access holds one lock.
"""
from __future__ import annotations

import threading

# seconds; decode steps of a small model on a GPU take milliseconds, a long prefill on a CPU seconds
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
               0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0)
PREFIX = "nanoqwen_"


class Histogram:
    def __init__(self, buckets):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out = [f'{name}_bucket{{{labels},le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        return out + [f'{name}_bucket{{{labels},le="+Inf"}} {self.count}', f"{name}_sum{{{labels}}} {self.sum}",
                      f"{name}_count{{{labels}}} {self.count}"]


class Metrics:
    def __init__(self, model_name: str):
        self.labels = f'model_name="{_escape(model_name)}"'
        self.lock = threading.Lock()
        self.running = self.waiting = 0
        self.free_blocks = self.num_blocks = None
        self.prompt_tokens = self.generation_tokens = 0
        self.finished: dict[str, int] = {}
        self.ttft, self.itl, self.e2e = Histogram(TTFT_BUCKETS), Histogram(ITL_BUCKETS), Histogram(E2E_BUCKETS)

    def set_engine_state(self, running: int, waiting: int, free_blocks: int | None, num_blocks: int | None) -> None:
        with self.lock:
            self.running, self.waiting, self.free_blocks, self.num_blocks = running, waiting, free_blocks, num_blocks

    def add_prompt_tokens(self, n: int) -> None:
        with self.lock:
            self.prompt_tokens += n

    def add_generation_tokens(self, n: int) -> None:
        with self.lock:
            self.generation_tokens += n

    def observe_first_token(self, seconds: float) -> None:
        with self.lock:
            self.ttft.observe(seconds)

    def observe_inter_token(self, seconds: float) -> None:
        with self.lock:
            self.itl.observe(seconds)

    def observe_finished(self, reason: str | None, seconds: float) -> None:
        with self.lock:
            self.finished[reason or "unknown"] = self.finished.get(reason or "unknown", 0) + 1
            self.e2e.observe(seconds)

    def render(self) -> str:
        p, lb = PREFIX, self.labels
        with self.lock:
            out = []

            def metric(name, kind, help_text, lines):
                out.extend([f"# HELP {p}{name} {help_text}", f"# TYPE {p}{name} {kind}", *lines])

            metric("num_requests_running", "gauge", "Requests in the running batch.",
                   [f"{p}num_requests_running{{{lb}}} {self.running}"])
            metric("num_requests_waiting", "gauge", "Requests waiting to be scheduled.",
                   [f"{p}num_requests_waiting{{{lb}}} {self.waiting}"])
            if self.num_blocks:
                used = self.num_blocks - self.free_blocks
                metric("kv_cache_usage_perc", "gauge", "Fraction of the KV-cache blocks in use (1 = full).",
                       [f"{p}kv_cache_usage_perc{{{lb}}} {used / self.num_blocks}"])
                metric("kv_cache_blocks_free", "gauge", "KV-cache blocks free (cached prefix blocks included).",
                       [f"{p}kv_cache_blocks_free{{{lb}}} {self.free_blocks}"])
                metric("kv_cache_blocks_total", "gauge", "KV-cache blocks in all.",
                       [f"{p}kv_cache_blocks_total{{{lb}}} {self.num_blocks}"])
            metric("prompt_tokens_total", "counter", "Prompt tokens of accepted requests.",
                   [f"{p}prompt_tokens_total{{{lb}}} {self.prompt_tokens}"])
            metric("generation_tokens_total", "counter", "Generated tokens.",
                   [f"{p}generation_tokens_total{{{lb}}} {self.generation_tokens}"])
            metric("request_success_total", "counter", "Finished requests by finish reason (abort: the client left).",
                   [f'{p}request_success_total{{{lb},finished_reason="{r}"}} {n}'
                    for r, n in sorted(self.finished.items())])
            metric("time_to_first_token_seconds", "histogram", "From the request's arrival to its first token.",
                   self.ttft.lines(f"{p}time_to_first_token_seconds", lb))
            metric("inter_token_latency_seconds", "histogram", "Between a request's consecutive engine outputs.",
                   self.itl.lines(f"{p}inter_token_latency_seconds", lb))
            metric("e2e_request_latency_seconds", "histogram", "From the request's arrival to its end.",
                   self.e2e.lines(f"{p}e2e_request_latency_seconds", lb))
        return "\n".join(out) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
