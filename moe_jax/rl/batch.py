"""From scored groups to the learner's batch (learner.py's keys), and dynamic sampling.

Row b is one completion: prompt ids, then the completion's ids, then padding to a fixed T, so
the jitted step compiles once. Position t holds the log-prob of tokens[t] given tokens[:t], as
learner.logprobs computes it: completion token j sits at P + j (P = prompt length) and its
behaviour log-prob (the engine's) at the same position. The EOS that ended a completion
(Group.stops) follows its last token and is trained like any other: stopping gets its gradient. The mask is 1
exactly on the completion's tokens and that EOS.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from moe_jax.rl import objective
from moe_jax.rl.config import RLConfig
from moe_jax.rl.rollout import Group


def _bad(name, value, allowed):
  raise ValueError(f"{name}={value!r}: {allowed}")


def bucket(length: int, multiple: int = 16) -> int:
  """length rounded up to a multiple: the fixed T of a run's batches."""
  return -(-length // multiple) * multiple


def make_batch(groups: Sequence[Group], rl: RLConfig, seq_len: int, *,
               pad_id: int = 0) -> dict:
  """numpy arrays tokens/mask/behaviour_logp [B, seq_len], advantages [B] (B = groups x G) and,
  with rl.router_replay, routes [B, seq_len, L, K] (-1: the router's own choice)."""
  if not groups:
    _bad("groups", groups, "must hold at least one group")
  sizes = {len(g.token_ids) for g in groups}
  if len(sizes) != 1:
    _bad("groups", f"sizes {sorted(sizes)}", "must all have the same number of completions")
  if rl.router_replay and any(g.routes is None for g in groups):
    _bad("rl.router_replay", True, "needs the engine's routes (Engine(record_routes=True))")
  rows = [(g, i) for g in groups for i in range(len(g.token_ids))]
  B = len(rows)
  tokens = np.full((B, seq_len), max(pad_id, 0), np.int32)
  mask = np.zeros((B, seq_len), np.float32)
  logp = np.zeros((B, seq_len), np.float32)
  routes = None
  for b, (g, i) in enumerate(rows):
    P, ids, old = len(g.prompt_ids), list(g.token_ids[i]), list(g.logprobs[i])
    if len(old) != len(ids):
      _bad("logprobs", f"{len(old)} values", f"must match the {len(ids)} tokens")
    stop = g.stops[i] if g.stops is not None else None
    if stop is not None:
      ids, old = ids + [stop[0]], old + [stop[1]]
    n = P + len(ids)
    if n > seq_len:
      _bad("seq_len", seq_len, f"must be >= prompt + completion (+ its EOS) = {n} tokens")
    tokens[b, :n] = list(g.prompt_ids) + ids
    mask[b, P:n] = 1.0
    logp[b, P:n] = old
    if rl.router_replay:
      r = np.asarray(g.routes[i], np.int32)
      if routes is None:
        routes = np.full((B, seq_len) + r.shape[1:], -1, np.int32)
      routes[b, :len(r)] = r[:seq_len]
  rewards_NxG = np.stack([np.asarray(g.rewards, np.float64) for g in groups])
  adv = np.asarray(objective.group_advantages(rewards_NxG, scale=rl.scale_advantages))
  out = {"tokens": tokens, "mask": mask, "behaviour_logp": logp,
         "advantages": adv.reshape(-1).astype(np.float32)}
  if routes is not None:
    out["routes"] = routes
  return out


def fill_groups(draw: Callable[[int], list[Group]], count: int, *, drop_uniform: bool,
                max_draws: int = 4) -> tuple[list[Group], dict]:
  """`count` groups from draw(n) (n groups of fresh prompts per call). With drop_uniform
  (dynamic sampling), groups whose rewards are all equal are dropped and more are drawn, at most
  max_draws calls; if still short, dropped groups fill the rest (they carry zero advantage).
  Stats: groups drawn, the share of them that were uniform, draws made."""
  if max_draws < 1:
    _bad("max_draws", max_draws, "must be an integer >= 1")
  kept, spare, drawn, draws, n_uniform = [], [], 0, 0, 0
  while len(kept) < count and draws < (max_draws if drop_uniform else 1):
    new = draw(count - len(kept))
    draws, drawn = draws + 1, drawn + len(new)
    if not new:
      break
    uniform = objective.uniform_groups(np.stack([g.rewards for g in new]))
    n_uniform += int(uniform.sum())
    for g, u in zip(new, uniform):
      (spare if drop_uniform and u else kept).append(g)
  kept += spare[:count - len(kept)]
  if len(kept) < count:
    _bad("draw", f"{len(kept)} groups", f"must give the {count} asked for")
  return kept[:count], {"groups_drawn": drawn, "uniform_fraction": n_uniform / max(drawn, 1),
                        "draws": draws}
