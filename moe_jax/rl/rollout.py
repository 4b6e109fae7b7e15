"""Rollouts and evaluation through the inference engine: G completions per prompt share the
prompt's cached blocks (one prefill per prompt), each token's behaviour log-probability is kept.

A completion ends at EOS (the noisy base corpus ends every document with it) or at max_tokens;
no stop string, since the engine cuts a stop string off the text and `</answer>` must stay for
the format check.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import numpy as np

from moe_jax.rl import evaluate, rewards, tasks
from moe_jax.serve import Engine, Request


@dataclasses.dataclass
class Group:
  """One prompt's G completions and their rewards."""
  problem: tasks.Problem
  prompt_ids: list[int]
  token_ids: list[list[int]]   # per completion (the EOS that ended it is not included)
  logprobs: list[list[float]]  # behaviour log-probs of token_ids: the sampling distribution's
                               # (Choice.sample_logprobs: temperature and top-p applied)
  texts: list[str]
  rewards: np.ndarray          # [G] float64
  # Engine(record_routes=True): per completion int32 [prompt + completion, L, K] (Choice.routes)
  routes: Optional[list[np.ndarray]] = None
  # per completion, the EOS (or stop token) that ended it and its behaviour log-prob; None when
  # it ran out of budget. The learner trains it: stopping is an action too.
  stops: Optional[list[Optional[tuple[int, float]]]] = None


def sample_groups(engine: Engine, problems: Sequence[tasks.Problem], group_size: int, *,
                  max_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                  seed: int = 0, reward_fn: Optional[Callable[[tasks.Problem, str], float]] = None,
                  **reward_weights) -> list[Group]:
  """G = group_size completions of each problem's prompt; request i draws with seed + i.
  Rewards are rewards.rewards(**reward_weights), or reward_fn(problem, text) when given."""
  requests = [Request(tasks.prompt(p), max_tokens=max_tokens, temperature=temperature,
                      top_p=top_p, n=group_size, seed=seed + i)
              for i, p in enumerate(problems)]
  groups = []
  for p, done in zip(problems, engine.generate(requests)):
    texts = [c.text for c in done.choices]
    routes = [c.routes for c in done.choices]
    stops = [None if c.stop_token is None else (c.stop_token, c.stop_logprob)
             for c in done.choices]
    groups.append(Group(p, done.prompt_token_ids, [c.token_ids for c in done.choices],
                        [c.sample_logprobs for c in done.choices], texts,
                        np.array([reward_fn(p, t) for t in texts], np.float64) if reward_fn
                        else rewards.rewards([p] * len(texts), texts, **reward_weights),
                        None if any(r is None for r in routes) else routes, stops))
  return groups


def evaluate_problems(engine: Engine, problems: Sequence[tasks.Problem], k: int, *,
                      max_tokens: int, temperature: float = 0.6, top_p: float = 0.95,
                      seed: int = 0) -> dict:
  """pass@1 (mean correctness over k samples), pass@k, cons@k, format rate and mean response
  length on `problems`, sampled as R1 is evaluated (temperature 0.6, top-p 0.95); add/mul also
  get `answers` (evaluate.answer_kinds)."""
  groups = sample_groups(engine, problems, k, max_tokens=max_tokens, temperature=temperature,
                         top_p=top_p, seed=seed)
  texts = [g.texts for g in groups]
  out = evaluate.summarize(problems, texts, [[len(t) for t in g.token_ids] for g in groups],
                           ks=(k,))
  if all(p.kind != "countdown" for p in problems):
    out["answers"] = evaluate.answer_kinds(problems, texts)
  return out
