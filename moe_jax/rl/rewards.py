"""Rule-based rewards on a completion's decoded text (the engine's `Choice.text`: the response
only, without the prompt, which itself names the tags).

R1-Zero used two rule rewards, no learned reward model: an accuracy reward (the final answer,
in a set format, checked by rule) and a format reward (thinking between <think> and </think>).
Here a reward is

    accuracy * [well formed and the answer is right] + (format_bonus if well formed
                                                        else -format_penalty)

A response is well formed when it is, in this order and nothing else:
    optional whitespace, "<think>", any text, "</think>", optional whitespace,
    "<answer>", text that is not only whitespace, "</answer>", optional whitespace
where neither text contains any of the four tags. Whitespace is Python's (str.isspace). So a
response stopped at the stop string "</answer>" (which the engine cuts off) is not well formed:
stop on EOS, or put the tag back before grading.
"""
from __future__ import annotations

import math
import re
from typing import Optional, Sequence

import numpy as np

from moe_jax.rl.tasks import Problem, check_answer

TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_FORMAT = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)


def parse_response(text: str) -> Optional[tuple[str, str]]:
  """(think, answer) of a well-formed response, the answer stripped of whitespace; else None."""
  m = _FORMAT.fullmatch(text)
  if m is None:
    return None
  think, answer = m.group(1), m.group(2)
  if any(tag in think or tag in answer for tag in TAGS) or not answer.strip():
    return None
  return think, answer.strip()


def format_ok(text: str) -> bool:
  return parse_response(text) is not None


def extract_answer(text: str) -> Optional[str]:
  """The stripped answer of a well-formed response; None otherwise (an answer outside the format
  counts for nothing, neither in the reward nor in evaluation)."""
  parsed = parse_response(text)
  return None if parsed is None else parsed[1]


def is_correct(problem: Problem, text: str) -> bool:
  answer = extract_answer(text)
  return answer is not None and check_answer(problem, answer)


def _check_weight(name, value):
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise ValueError(f"{name}={value!r}: must be a finite number")


def reward(problem: Problem, text: str, *, accuracy: float = 1.0, format_bonus: float = 0.1,
           format_penalty: float = 0.0) -> float:
  """The rule reward of one completion (see the module docstring)."""
  for name, value in (("accuracy", accuracy), ("format_bonus", format_bonus),
                      ("format_penalty", format_penalty)):
    _check_weight(name, value)
  answer = extract_answer(text)
  if answer is None:
    return -float(format_penalty)
  return float(accuracy) * check_answer(problem, answer) + float(format_bonus)


def rewards(problems: Sequence[Problem], texts: Sequence[str], **weights) -> np.ndarray:
  """float64 [N] rewards of N completions, `problems[i]` being the problem of `texts[i]`."""
  if len(problems) != len(texts):
    raise ValueError(f"texts={len(texts)} completions: must match problems={len(problems)}")
  return np.array([reward(p, t, **weights) for p, t in zip(problems, texts)], np.float64)
