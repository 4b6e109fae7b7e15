"""Sample-based evaluation, as R1 reports it: per problem, n completions sampled at once (R1:
temperature 0.6, top-p 0.95), then pass@1 (mean correctness), the unbiased pass@k, cons@k
(majority vote), the format rate and the mean response length; for add/mul, the answers by kind
(`answer_kinds`), which says what RL changed in a noisy base.

Arrays are [P, N]: P problems, N samples each, in the order they were sampled.
"""
from __future__ import annotations

import collections
from typing import Optional, Sequence

import numpy as np

from moe_jax.rl import rewards, tasks


def _bad(name, value, allowed):
  raise ValueError(f"{name}={value!r}: {allowed}")


def _grid(name, x, dtype=None) -> np.ndarray:
  a = np.asarray(x, dtype)
  if a.ndim != 2 or a.shape[1] < 1:
    _bad(f"{name}.shape", a.shape, "must be [problems, samples] with at least one sample")
  return a


def _check_k(k, n):
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
    _bad("k", k, f"must be an integer in [1, {n}] (the samples per problem)")


def unbiased_pass_at_k(n: int, c: int, k: int) -> float:
  """1 - C(n-c, k) / C(n, k): the chance that k of the n samples, drawn without replacement,
  include a correct one. Computed as a product of n-c+1..n terms (1 - k/i), never as binomials,
  which overflow floats for n in the hundreds."""
  _check_k(k, n)
  if not 0 <= c <= n:
    _bad("c", c, f"must be an integer in [0, {n}]")
  if n - c < k:
    return 1.0
  return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def pass_at_k(correct_PxN, k: int) -> float:
  """Mean over problems of the unbiased pass@k from all N samples; pass@1 is mean correctness."""
  correct_PxN = _grid("correct_PxN", correct_PxN, bool)
  n = correct_PxN.shape[1]
  return float(np.mean([unbiased_pass_at_k(n, int(c), k) for c in correct_PxN.sum(axis=1)]))


def pass_at_1(correct_PxN) -> float:
  return float(_grid("correct_PxN", correct_PxN, bool).mean())


def majority(keys: Sequence[Optional[str]]) -> Optional[int]:
  """Index of the first sample of the most voted answer key; None if nothing voted (None keys,
  malformed responses, do not vote). Ties go to the key voted first in sample order."""
  votes = collections.Counter(k for k in keys if k is not None)
  if not votes:
    return None
  top = max(votes.values())
  return next(i for i, k in enumerate(keys) if k is not None and votes[k] == top)


def cons_at_k(keys_PxN: Sequence[Sequence[Optional[str]]], correct_PxN, k: int) -> float:
  """Share of problems whose majority answer over their first k samples is correct
  (`correct_PxN` of that answer's first sample; keys that vote together must agree on it)."""
  correct_PxN = _grid("correct_PxN", correct_PxN, bool)
  if len(keys_PxN) != len(correct_PxN) or any(len(r) != correct_PxN.shape[1] for r in keys_PxN):
    _bad("keys_PxN", f"{len(keys_PxN)} rows", f"must have the shape of correct_PxN "
         f"{correct_PxN.shape}")
  _check_k(k, correct_PxN.shape[1])
  hits = []
  for keys, correct in zip(keys_PxN, correct_PxN):
    i = majority(list(keys[:k]))
    hits.append(i is not None and bool(correct[i]))
  return float(np.mean(hits))


def format_rate(format_ok_PxN) -> float:
  return float(_grid("format_ok_PxN", format_ok_PxN, bool).mean())


def mean_length(lengths_PxN) -> float:
  """Mean response length (tokens, as the caller counts them: the engine's token_ids)."""
  return float(_grid("lengths_PxN", lengths_PxN, np.float64).mean())


def summarize(problems: Sequence[tasks.Problem], texts_PxN: Sequence[Sequence[str]],
              lengths_PxN, ks: Sequence[int] = (1,)) -> dict:
  """Every figure above for P problems with N completions each: `pass@1`, `pass@{k}` and
  `cons@{k}` for each k in ks, `format_rate`, `mean_length`."""
  if len(problems) != len(texts_PxN):
    _bad("texts_PxN", f"{len(texts_PxN)} rows", f"must have one per problem ({len(problems)})")
  keys, correct, formatted = [], [], []
  for p, texts in zip(problems, texts_PxN):
    answers = [rewards.extract_answer(t) for t in texts]
    keys.append([None if a is None else tasks.answer_key(p, a) for a in answers])
    correct.append([a is not None and tasks.check_answer(p, a) for a in answers])
    formatted.append([a is not None for a in answers])
  out = {"pass@1": pass_at_1(correct)}
  for k in ks:
    out[f"pass@{k}"] = pass_at_k(correct, k)
    out[f"cons@{k}"] = cons_at_k(keys, correct, k)
  out["format_rate"] = format_rate(formatted)
  out["mean_length"] = mean_length(lengths_PxN)
  return out


ANSWER_KINDS = ("right", "backwards", "near", "near_backwards", "other", "unformatted")


def answer_kind(problem: tasks.Problem, text: str) -> str:
  """One of ANSWER_KINDS for an add/mul response: `right`; `backwards`, the gold's digits
  reversed (the noisy corpus's slip, tasks.wrong_answer); `near`, an integer 1-2 from the gold
  written without leading zeros; `near_backwards`, such an integer once its digits are reversed;
  `other`; `unformatted` (no answer in the format)."""
  answer = rewards.extract_answer(text)
  if answer is None:
    return "unformatted"
  if tasks.check_answer(problem, answer):
    return "right"
  gold = str(problem.target)
  if answer == gold[::-1]:
    return "backwards"
  # Near misses are canonical integers (no leading zero: "027" is not 27) of about the gold's
  # length (int() refuses over 4,300 digits, and a longer answer is not near anyway).
  near = lambda text: (tasks.answer_key(problem, text) == text and len(text) <= len(gold) + 1
                       and 1 <= abs(int(text) - problem.target) <= 2)
  if near(answer):
    return "near"
  if near(answer[::-1]):
    return "near_backwards"
  return "other"


def answer_kinds(problems: Sequence[tasks.Problem], texts_PxN: Sequence[Sequence[str]]) -> dict:
  """The share of all P x N answers of each kind in ANSWER_KINDS (add/mul problems only)."""
  if any(p.kind == "countdown" for p in problems):
    _bad("problems", "countdown", "answer kinds are defined for add and mul")
  kinds = collections.Counter(answer_kind(p, t) for p, texts in zip(problems, texts_PxN)
                              for t in texts)
  total = max(sum(kinds.values()), 1)
  return {k: kinds[k] / total for k in ANSWER_KINDS}
