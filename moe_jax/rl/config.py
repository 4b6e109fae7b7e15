"""The RL run's settings (`rl.*` in a config file), a frozen dataclass checked on construction.

Like moe_jax/config.py this imports no JAX, so a config validates before any backend starts.
Every bad value fails with one line naming `rl.<key>`.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Mapping

from moe_jax.config import ConfigError

LOSS_AGGS = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """GRPO-style RL over the engine's rollouts (moe_jax/rl/learner.py takes it)."""
  steps: int = 100                   # rollout batches
  prompts_per_step: int = 8          # prompts per rollout batch
  group_size: int = 8                # completions per prompt (G)
  minibatches: int = 1               # optimizer updates per rollout batch
  learning_rate: float = 1e-5        # constant (R1-Zero: 3e-6)
  clip_low: float = 0.2              # ratio clipped below at 1 - clip_low (>= 1: never)
  clip_high: float = 0.2             # ... and above at 1 + clip_high (DAPO: 0.28)
  kl_coef: float = 0.0               # k3 KL to the reference policy; 0 skips the reference
  ref_update_every: int = 0          # steps between reference refreshes; 0 = frozen
  scale_advantages: bool = True      # divide by the group's std (False: Dr. GRPO)
  loss_agg: str = "seq_mean_token_mean"  # or "token_mean" (DAPO), "seq_mean_token_sum_norm"
  drop_uniform_groups: bool = False  # dynamic sampling: refill groups with equal rewards
  max_draws: int = 4                 # ... at most this many rollout rounds per step, then the
                                     # uniform groups fill the batch (zero advantage)
  router_replay: bool = True         # the learner reuses the rollout's expert choices
  temperature: float = 1.0           # rollout sampling
  top_p: float = 1.0
  max_tokens: int = 64               # generation budget (Dr. GRPO's normaliser too)
  # experiments/r1_zero.py: the task, the noisy base corpus, evaluation and checkpoints
  task_kind: str = "add"             # tasks.TaskSpec: "add", "mul" or "countdown"
  task_digits: int = 2               # digits per operand (parity: bits)
  task_count: int = 2                # operands (countdown: numbers given)
  corpus_docs: int = 20000           # noisy pre-training documents
  corpus_error_rate: float = 0.5     # share of them with a wrong answer
  # experiments/r1_thinking.py (moe_jax/rl/thinking.py): the base corpus's mixture of forms
  long_share: float = 0.0            # share of documents with a long worked derivation
  self_check_share: float = 0.0      # share of long ones with a wrong step, "wait" and the fix
  eval_every: int = 0                # RL steps between small held-out evaluations; 0: none
  eval_problems: int = 64            # held-out problems, evaluated before and after RL
  eval_k: int = 16                   # samples per problem (pass@1, cons@k, pass@k)
  checkpoint_every: int = 10         # RL steps between checkpoints
  seed: int = 0                      # problem order and sampling

  def __post_init__(self):
    hints = typing.get_type_hints(RLConfig)
    for field in dataclasses.fields(self):
      value, hint = getattr(self, field.name), hints[field.name]
      ok = {bool: isinstance(value, bool), str: isinstance(value, str),
            int: isinstance(value, int) and not isinstance(value, bool),
            float: isinstance(value, (int, float)) and not isinstance(value, bool) and
            math.isfinite(value)}[hint]
      if not ok:
        _fail(field.name, value, "must be " + {bool: "True or False", str: "a string",
                                                int: "an integer",
                                                float: "a finite number"}[hint])
    for name in ("steps", "prompts_per_step", "group_size", "minibatches", "max_tokens",
                 "max_draws",
                 "corpus_docs", "eval_problems", "eval_k", "checkpoint_every"):
      if getattr(self, name) < 1:
        _fail(name, getattr(self, name), "must be an integer >= 1")
    if self.group_size < 2:
      _fail("group_size", self.group_size, "must be >= 2 (advantages are relative to the group)")
    for name in ("learning_rate", "clip_high", "kl_coef", "ref_update_every", "seed",
                 "eval_every"):
      if getattr(self, name) < 0:
        _fail(name, getattr(self, name), "must be >= 0")
    if self.clip_low < 0:
      _fail("clip_low", self.clip_low, "must be >= 0 (>= 1: no lower clip, R1-Zero's 10)")
    if not 0 < self.temperature <= 100:
      _fail("temperature", self.temperature, "must be in (0, 100] (RL samples; 0 is greedy)")
    if not 0 < self.top_p <= 1:
      _fail("top_p", self.top_p, "must be in (0, 1]")
    for name in ("corpus_error_rate", "long_share", "self_check_share"):
      if not 0 <= getattr(self, name) <= 1:
        _fail(name, getattr(self, name), "must be in [0, 1]")
    if self.loss_agg not in LOSS_AGGS:
      _fail("loss_agg", self.loss_agg, f"must be one of {', '.join(map(repr, LOSS_AGGS))}")
    rollouts = self.prompts_per_step * self.group_size
    if rollouts % self.minibatches:
      _fail("minibatches", self.minibatches,
            f"must divide rl.prompts_per_step*group_size={rollouts} completions")


def _fail(key: str, value: Any, allowed: str):
  raise ConfigError(f"rl.{key}={value!r}: {allowed}")


def from_dict(values: Mapping[str, Any]) -> RLConfig:
  """RLConfig of an `rl` section (a ConfigDict or a dict); unknown keys fail, ints widen to
  floats where a float is meant."""
  if not isinstance(values, Mapping):
    values = values.to_dict() if hasattr(values, "to_dict") else values
  if not isinstance(values, Mapping):
    raise ConfigError(f"rl={values!r}: must be a section (a ConfigDict)")
  hints = typing.get_type_hints(RLConfig)
  kwargs = {}
  for key, value in values.items():
    if key not in hints:
      _fail(key, value, f"unknown key; rl has {', '.join(hints)}")
    wide = hints[key] is float and isinstance(value, int) and not isinstance(value, bool)
    kwargs[key] = float(value) if wide else value
  return RLConfig(**kwargs)
