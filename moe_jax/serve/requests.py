"""What goes into the engine and what comes out: requests, completions, usage and its cost."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence, Union


class BadRequest(ValueError):
  """A request the engine cannot serve as given (one line: the field, the value, what is
  allowed): the client's to fix (HTTP 400)."""

  status = 400


class RequestFailed(RuntimeError):
  """A request the engine accepted but could not finish (HTTP 500): the cause is named; the
  engine goes on serving the others."""

  status = 500


class EngineStopped(RuntimeError):
  """The engine itself cannot go on (`Engine.error` says why); every request is refused."""

  status = 503

MAX_TOP_LOGPROBS = 20


@dataclasses.dataclass
class Request:
  """One prompt (text, or token ids) and how to continue it; n completions share the prompt."""
  prompt: Union[str, Sequence[int]]
  max_tokens: int = 16
  temperature: float = 0.0  # 0: greedy
  top_p: float = 1.0
  top_k: int = 0            # 0: no top-k cut
  n: int = 1
  seed: Optional[int] = None  # None: fresh entropy per request (OpenAI); an int reproduces
  stop: Sequence[str] = ()
  stop_token_ids: Sequence[int] = ()
  ignore_eos: bool = False
  top_logprobs: int = 0     # per token, the k most likely tokens' log-probs (Choice.top_logprobs)

  def check(self, max_len: int, prompt_len: int, vocab_size: int):
    def bad(field, value, allowed):
      raise BadRequest(f"{field}={value!r}: {allowed}")
    if prompt_len < 1:
      bad("prompt", self.prompt, "must hold at least one token")
    if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or \
        self.max_tokens < 1:
      bad("max_tokens", self.max_tokens, "must be an integer >= 1")
    if prompt_len >= max_len:
      bad("prompt", f"<{prompt_len} tokens>",
          f"the prompt is {prompt_len} tokens; max_model_len={max_len} (the model's "
          f"max_seq_len) holds at most {max_len - 1} prompt tokens and one generated token")
    if prompt_len + self.max_tokens > max_len:
      bad("max_tokens", self.max_tokens,
          f"the prompt's {prompt_len} tokens plus max_tokens exceed the model's "
          f"max_seq_len={max_len}")
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    if not number(self.temperature) or not 0 <= self.temperature <= 100:
      bad("temperature", self.temperature, "must be a number in [0, 100] (0 = greedy)")
    if not number(self.top_p) or not 0 < self.top_p <= 1:
      bad("top_p", self.top_p, "must be in (0, 1]")
    if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
      bad("top_k", self.top_k, "must be an integer >= 0 (0 = off)")
    if isinstance(self.n, bool) or not isinstance(self.n, int) or not 1 <= self.n <= 128:
      bad("n", self.n, "must be an integer in [1, 128]")
    if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                  or not 0 <= self.seed < 2**31):
      bad("seed", self.seed, "must be an integer in [0, 2**31), or None (fresh entropy)")
    if isinstance(self.top_logprobs, bool) or not isinstance(self.top_logprobs, int) or \
        not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
      bad("top_logprobs", self.top_logprobs, f"must be an integer in [0, {MAX_TOP_LOGPROBS}]")
    if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
      bad("stop", self.stop, "must be a list of non-empty strings")
    if isinstance(self.stop_token_ids, (str, bytes)) or not all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size
        for t in self.stop_token_ids):
      bad("stop_token_ids", self.stop_token_ids,
          f"must be a list of token ids in [0, {vocab_size})")


@dataclasses.dataclass
class Choice:
  index: int
  text: str
  token_ids: list[int]
  logprobs: list[float]  # of each token in token_ids, under the model (temperature 1)
  finish_reason: str     # "stop" (a stop string or token) or "length"
  # Engine(record_routes=True): int32 [prompt + len(token_ids), MoE blocks, top_k], the experts
  # each position chose (what router replay feeds model.apply); -1 on a token never fed.
  routes: Optional[Any] = None
  # For RL (moe_jax/rl): each token's log-prob under the sampling distribution (temperature,
  # top-k, top-p applied; sampling.sample), and the stop token id (EOS or a stop_token_id) that
  # ended the choice with its sampling log-prob; None when it ended otherwise.
  sample_logprobs: list[float] = dataclasses.field(default_factory=list)
  stop_token: Optional[int] = None
  stop_logprob: Optional[float] = None
  # Request.top_logprobs = k > 0: per token, {token id: log-prob} of the k most likely tokens.
  top_logprobs: Optional[list] = None


@dataclasses.dataclass
class Usage:
  prompt_tokens: int = 0
  prompt_cache_hit_tokens: int = 0
  prompt_cache_miss_tokens: int = 0
  completion_tokens: int = 0

  def __add__(self, other: "Usage") -> "Usage":
    return Usage(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


@dataclasses.dataclass
class Completion:
  prompt_token_ids: list[int]
  choices: list[Choice]
  usage: Usage
  # A request that failed after it was accepted: RequestFailed (its cause named), no choices.
  error: Optional[Exception] = None


@dataclasses.dataclass(frozen=True)
class Prices:
  """Per million tokens (defaults: DeepSeek-V3's API list prices in yuan, cache hit 0.5, miss 2,
  output 8)."""
  hit: float = 0.5
  miss: float = 2.0
  output: float = 8.0


def cost_report(usage: Usage, prices: Optional[Prices] = None) -> dict:
  """What a workload costs with the prefix cache, and what it would without one."""
  prices = prices or Prices()
  cost = (usage.prompt_cache_hit_tokens * prices.hit + usage.prompt_cache_miss_tokens * prices.miss
          + usage.completion_tokens * prices.output) / 1e6
  uncached = (usage.prompt_tokens * prices.miss + usage.completion_tokens * prices.output) / 1e6
  hit_rate = usage.prompt_cache_hit_tokens / max(usage.prompt_tokens, 1)
  return {**dataclasses.asdict(usage), "cache_hit_rate": hit_rate, "cost": cost,
          "cost_without_cache": uncached, "saving": 1 - cost / uncached if uncached else 0.0,
          "prices_per_million": dataclasses.asdict(prices)}
