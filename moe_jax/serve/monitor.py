"""What the HTTP server reports on /metrics, in Prometheus' text format (version 0.0.4).

The engine thread records each step (`stepped`) and each finished request (`finished`); request
handlers record refusals, failures and cancellations; `/metrics` renders a consistent copy.
Every series is prefixed moe_jax_; costs are in the unit of serve.price_* (per million tokens).
"""
from __future__ import annotations

import collections
import threading
import time
from typing import Optional

from moe_jax.serve.requests import Prices, Usage, cost_report

RATE_WINDOW_S = 10.0  # generation tokens/s is measured over this many recent seconds
OUTCOMES = ("finished", "cancelled", "refused", "failed")


class Monitor:
  """Counters and gauges, safe to update from the engine thread and read from the server's."""

  def __init__(self, prices: Optional[Prices] = None, clock=time.monotonic):
    self.prices, self.clock = prices or Prices(), clock
    self._lock = threading.Lock()
    self.usage = Usage()
    self.outcomes = collections.Counter()
    self.load = {"running": 0, "waiting": 0, "blocks_used": 0, "blocks_total": 0}
    self.generated = 0
    self.alive = True
    self._start = 0.0  # the first step's time
    self._samples: collections.deque = collections.deque()  # (time, tokens generated so far)

  def stepped(self, load: dict, generated: int):
    """After an engine step: its load (Engine.load()) and its count of generated tokens."""
    now = self.clock()
    with self._lock:
      if not self._samples:
        self._start = now
      self.load, self.generated = dict(load), generated
      self._samples.append((now, generated))
      while len(self._samples) > 1 and self._samples[1][0] <= now - RATE_WINDOW_S:
        self._samples.popleft()

  def finished(self, usage: Usage):
    with self._lock:
      self.usage = self.usage + usage
      self.outcomes["finished"] += 1

  def count(self, outcome: str):
    with self._lock:
      self.outcomes[outcome] += 1

  def died(self):
    with self._lock:
      self.alive = False

  def tokens_per_second(self) -> float:
    """Generated tokens per second over the last RATE_WINDOW_S seconds (fewer at the start)."""
    now = self.clock()
    with self._lock:
      if not self._samples or now <= self._start:
        return 0.0
      window = min(RATE_WINDOW_S, now - self._start)
      base = self._samples[0][1]
      for t, count in self._samples:
        if t <= now - window:
          base = count
      return (self._samples[-1][1] - base) / window

  def render(self) -> str:
    rate = self.tokens_per_second()
    with self._lock:
      usage, load, outcomes = self.usage, dict(self.load), dict(self.outcomes)
      generated, alive = self.generated, self.alive
    report = cost_report(usage, self.prices)
    lines = []

    def series(name, kind, help_, samples):
      lines.append(f"# HELP moe_jax_{name} {help_}")
      lines.append(f"# TYPE moe_jax_{name} {kind}")
      for labels, value in samples:
        label = ",".join(f'{k}="{v}"' for k, v in labels.items())
        lines.append(f"moe_jax_{name}{{{label}}} {float(value)!r}" if label
                     else f"moe_jax_{name} {float(value)!r}")
    series("engine_up", "gauge", "1 while the engine serves, 0 once it has stopped.",
           [({}, int(alive))])
    series("num_requests_running", "gauge", "Requests being computed.", [({}, load["running"])])
    series("num_requests_waiting", "gauge", "Requests queued for admission.",
           [({}, load["waiting"])])
    series("kv_blocks_used", "gauge", "KV pool blocks held by running requests.",
           [({}, load["blocks_used"])])
    series("kv_blocks_total", "gauge", "KV pool blocks in all.", [({}, load["blocks_total"])])
    series("prefix_cache_hit_rate", "gauge", "Share of prompt tokens served from the prefix "
           "cache, over all finished requests.", [({}, report["cache_hit_rate"])])
    series("generation_tokens_per_second", "gauge",
           f"Tokens generated per second over the last {RATE_WINDOW_S:g} s.", [({}, rate)])
    series("generation_tokens_total", "counter", "Tokens generated (cancelled requests' too).",
           [({}, generated)])
    series("prompt_tokens_total", "counter", "Prompt tokens of finished requests, by where "
           "they came from.", [({"source": "cache"}, usage.prompt_cache_hit_tokens),
                               ({"source": "computed"}, usage.prompt_cache_miss_tokens)])
    series("completion_tokens_total", "counter", "Completion tokens of finished requests.",
           [({}, usage.completion_tokens)])
    series("requests_total", "counter", "Requests by outcome: finished, cancelled (the client "
           "went away), refused (400), failed (500).",
           [({"outcome": o}, outcomes.get(o, 0)) for o in OUTCOMES])
    series("cost_total", "counter", "What finished requests cost at serve.price_* (per million "
           "tokens).", [({}, report["cost"])])
    series("cost_without_cache_total", "counter", "What they would have cost with no prefix "
           "cache.", [({}, report["cost_without_cache"])])
    series("price_per_million_tokens", "gauge", "The configured prices.",
           [({"kind": k}, v) for k, v in report["prices_per_million"].items()])
    return "\n".join(lines) + "\n"
