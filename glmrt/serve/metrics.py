"""The server's counters in Prometheus' text format (GET /metrics): requests by route and
status, requests running and waiting, tokens in and out, time to first token, decode rate.
Every series carries the replica's name, so several replicas behind one router can be told
apart. Written by hand: a few counters and two histograms need no client library.
"""
from __future__ import annotations

import collections
import threading

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


class Histogram:
    def __init__(self, buckets):
        self.buckets, self.counts, self.sum, self.n = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, v: float):
        self.sum += v
        self.n += 1
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out = [f'{name}_bucket{{{labels},le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{{labels},le="+Inf"}} {self.n}')
        return out + [f"{name}_sum{{{labels}}} {self.sum:.6f}", f"{name}_count{{{labels}}} {self.n}"]


class Metrics:
    def __init__(self, replica: str, model: str):
        self.labels = f'replica="{_escape(replica)}",model="{_escape(model)}"'
        self.lock = threading.Lock()
        self.requests: collections.Counter = collections.Counter()   # (route, status) -> n
        self.prompt_tokens = self.completion_tokens = self.cancelled = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.rate = Histogram(RATE_BUCKETS)

    def request(self, route: str, status: int):
        with self.lock:
            self.requests[(route, status)] += 1

    def generation(self, usage: dict | None, ttft: float | None, decode_s: float | None,
                   cancelled: bool):
        """One generation ended: its usage (None when it never finished), seconds to its first
        delta, and seconds from the first delta to the last."""
        with self.lock:
            if usage:
                self.prompt_tokens += usage["prompt_tokens"]
                self.completion_tokens += usage["completion_tokens"]
                if decode_s and usage["completion_tokens"] > 1:
                    self.rate.observe((usage["completion_tokens"] - 1) / decode_s)
            if ttft is not None:
                self.ttft.observe(ttft)
            self.cancelled += cancelled

    def render(self, running: int, waiting: int) -> str:
        L = self.labels
        with self.lock:
            lines = ["# HELP glmrt_info The replica serving and its model.", "# TYPE glmrt_info gauge",
                     f"glmrt_info{{{L}}} 1",
                     "# HELP glmrt_requests_total HTTP requests by route and status.",
                     "# TYPE glmrt_requests_total counter"]
            lines += [f'glmrt_requests_total{{{L},route="{_escape(r)}",status="{s}"}} {n}'
                      for (r, s), n in sorted(self.requests.items())]
            for name, kind, help_, v in [
                ("glmrt_requests_running", "gauge", "Generations running now.", running),
                ("glmrt_queue_length", "gauge", "Requests waiting for a slot.", waiting),
                ("glmrt_prompt_tokens_total", "counter", "Prompt tokens of finished generations.",
                 self.prompt_tokens),
                ("glmrt_generation_tokens_total", "counter", "Tokens generated (a stop token counts).",
                 self.completion_tokens),
                ("glmrt_generations_cancelled_total", "counter",
                 "Generations cut short (client gone, server shutting down).", self.cancelled)]:
                lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name}{{{L}}} {v}"]
            lines += ["# HELP glmrt_time_to_first_token_seconds Request start to the first streamed piece.",
                      "# TYPE glmrt_time_to_first_token_seconds histogram"]
            lines += self.ttft.lines("glmrt_time_to_first_token_seconds", L)
            lines += ["# HELP glmrt_decode_tokens_per_second Per generation, tokens after the first "
                      "over the time they took.", "# TYPE glmrt_decode_tokens_per_second histogram"]
            lines += self.rate.lines("glmrt_decode_tokens_per_second", L)
        return "\n".join(lines) + "\n"


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
