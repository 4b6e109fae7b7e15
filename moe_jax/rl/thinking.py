"""Tasks on which thinking pays, and a base corpus that mixes a short and a long form.

Two tasks, each hard to answer directly for a tiny model and easy with written work:

  parity  "Parity of 0110...?" with d bits: the answer is 1 if an odd number of bits are 1.
          Long form: per bit, the bit copied and the running parity after it (2 characters a
          step: "0110" -> "00 11 10 00" written without spaces, "00111000").
  add     "What is 4718+8529?": the sum. Long form: per column, least significant first, the
          column's digits and the carry in, and their sum ("8+9+0=17 1+2+1=04 7+5+0=12
          4+8+1=13"): every digit the step needs is copied next to it, so a step is local work.

A document is R1-Zero's template (tasks.PROMPT and tasks.completion) with a short think
section (empty: no work) or, with probability `long_share`, the long derivation; with
probability `self_check_share` a long derivation makes one wrong step, writes SELF_CHECK, and
redoes that step correctly. Every answer in the corpus is right: this is pre-training text, not
a noisy corpus (compare tasks.noisy_documents).

Splits: a problem's split is a hash of its canonical form (parity: the bit string; add: the
sorted operands, as tasks.canonical), never of the seed, so train and held-out are disjoint
under any seeds. Held-out reports also use other sizes (`other_sizes`): more or fewer bits,
digits or operands than trained.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Iterator, Optional

import numpy as np

from moe_jax import data
from moe_jax.rl import rewards, tasks

KINDS = ("parity", "add")
SELF_CHECK = " wait "          # what a self-check writes between the wrong step and its fix
_SIZES = {"parity": (2, 64), "add": (1, 12)}
_MAX_ATTEMPTS = 10_000


def _bad(name, value, allowed):
  raise ValueError(f"{name}={value!r}: {allowed}")


@dataclasses.dataclass(frozen=True)
class ThinkSpec:
  """One task at one size."""
  kind: str = "parity"            # "parity" or "add"
  size: int = 16                  # parity: bits; add: digits per operand
  count: int = 2                  # add: operands (parity: unused, 1)
  heldout_fraction: float = 0.1   # share of all problems (by hash) held out

  def __post_init__(self):
    if self.kind not in KINDS:
      _bad("kind", self.kind, f"must be one of {', '.join(map(repr, KINDS))}")
    lo, hi = _SIZES[self.kind]
    if isinstance(self.size, bool) or not isinstance(self.size, int) or not lo <= self.size <= hi:
      _bad("size", self.size, f"must be an integer in [{lo}, {hi}] for kind={self.kind!r}")
    if self.kind == "add" and (isinstance(self.count, bool) or not isinstance(self.count, int)
                               or not 2 <= self.count <= 9):
      _bad("count", self.count, "must be an integer in [2, 9] for kind='add'")
    if not isinstance(self.heldout_fraction, (int, float)) or \
        not 0 < self.heldout_fraction < 1:
      _bad("heldout_fraction", self.heldout_fraction, "must be a number in (0, 1)")

  @property
  def name(self) -> str:
    return f"parity{self.size}" if self.kind == "parity" else f"add{self.count}x{self.size}"


def other_sizes(spec: ThinkSpec) -> list[ThinkSpec]:
  """The untrained sizes every held-out report includes."""
  lo, hi = _SIZES[spec.kind]
  if spec.kind == "parity":
    # below 8 bits a held-out split (10% of 2^d problems) is too small to report on
    sizes = [s for s in (spec.size - 4, spec.size + 4, spec.size + 8) if 8 <= s <= hi]
    return [dataclasses.replace(spec, size=s) for s in sizes]
  out = [dataclasses.replace(spec, size=s) for s in (spec.size - 1, spec.size + 1)
         if lo <= s <= hi]
  return out + [dataclasses.replace(spec, count=spec.count + 1)] if spec.count < 9 else out


# ---- Problems and splits ------------------------------------------------------------------------

def canonical(p: tasks.Problem) -> str:
  if p.kind == "parity":
    return "parity:" + "".join(map(str, p.numbers))
  return tasks.canonical(p)


def split_of(p: tasks.Problem, heldout_fraction: float) -> str:
  digest = hashlib.blake2b(canonical(p).encode("utf-8"), digest_size=8).digest()
  return "heldout" if int.from_bytes(digest, "big") / 2.0**64 < heldout_fraction else "train"


def _draw(rng: np.random.Generator, spec: ThinkSpec) -> tasks.Problem:
  if spec.kind == "parity":
    bits = tuple(int(b) for b in rng.integers(0, 2, spec.size))
    target = sum(bits) % 2
    return tasks.Problem("parity", bits, target, f"Parity of {''.join(map(str, bits))}?",
                         str(target))
  lo = 10 ** (spec.size - 1) if spec.size > 1 else 0
  numbers = tuple(int(x) for x in rng.integers(lo, 10 ** spec.size, spec.count))
  return tasks.Problem("add", numbers, sum(numbers), f"What is {'+'.join(map(str, numbers))}?",
                       str(sum(numbers)))


def problem(spec: ThinkSpec, split: str, seed: int, index: int) -> tasks.Problem:
  """Problem `index` of `split`, a pure function of (spec, split, seed, index)."""
  if split not in tasks.SPLITS:
    _bad("split", split, f"must be one of {', '.join(map(repr, tasks.SPLITS))}")
  for name, value in (("seed", seed), ("index", index)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
      _bad(name, value, "must be an integer >= 0")
  rng = np.random.default_rng([seed, index, tasks.SPLITS.index(split), 100 + KINDS.index(
      spec.kind), spec.size, spec.count])
  for _ in range(_MAX_ATTEMPTS):
    p = _draw(rng, spec)
    if split_of(p, spec.heldout_fraction) == split:
      return p
  raise ValueError(f"split={split!r}: no problem of {spec} found in {_MAX_ATTEMPTS} draws")


def problems(spec: ThinkSpec, split: str, count: int, seed: int, *, start: int = 0,
             unique: bool = False) -> list[tasks.Problem]:
  """Problems start..start+count-1 of `split`; with `unique`, repeats are skipped."""
  return tasks.problems(spec, split, count, seed, start=start, unique=unique, draw=problem,
                        key=canonical)


# ---- The two forms ------------------------------------------------------------------------------

def steps(p: tasks.Problem) -> list[str]:
  """The long form's steps (module docstring); each ends with its result digit(s)."""
  out = []
  if p.kind == "parity":
    running = 0
    for b in p.numbers:
      running ^= b
      out.append(f"{b}{running}")
    return out
  if p.kind != "add":
    _bad("problem.kind", p.kind, "must be 'parity' or 'add'")
  width, carry = max(len(str(x)) for x in p.numbers), 0
  for col in range(width):
    digits = [x // 10 ** col % 10 for x in p.numbers]
    total = carry + sum(digits)
    out.append("+".join(map(str, digits + [carry])) + f"={total:02d}")
    carry = total // 10
  return out


def _join(p: tasks.Problem) -> str:
  return "" if p.kind == "parity" else " "


def _wrong(p: tasks.Problem, step: str, rng: np.random.Generator) -> str:
  """The step with its result off: the running parity flipped; a column's last digit moved."""
  if p.kind == "parity":
    return step[0] + str(1 - int(step[1]))
  return step[:-1] + str((int(step[-1]) + int(rng.integers(1, 10))) % 10)


def long_think(p: tasks.Problem, rng: Optional[np.random.Generator] = None,
               self_check: bool = False) -> str:
  """The worked derivation; with self_check, one step written wrong, SELF_CHECK, then right."""
  work, sep = steps(p), _join(p)
  if not self_check:
    return sep.join(work)
  rng = rng if rng is not None else np.random.default_rng(0)
  k = int(rng.integers(len(work)))
  done = sep.join(work[:k]) + (sep if k else "")
  return done + _wrong(p, work[k], rng) + SELF_CHECK + sep.join(work[k:])


def long_length(p: tasks.Problem) -> int:
  """Bytes of the long form's response (think + tags + answer), without self-check."""
  return len(tasks.completion(long_think(p), p.answer).encode("utf-8"))


def form(p: tasks.Problem, text: str) -> Optional[str]:
  """'long' when the response's think section is at least half as long as the derivation,
  'short' otherwise; None when the response is not well formed."""
  parsed = rewards.parse_response(text)
  if parsed is None:
    return None
  return "long" if 2 * len(parsed[0].strip()) >= len(long_think(p)) else "short"


def self_checks(text: str) -> int:
  """How many times the response writes the self-check phrase."""
  return text.count(SELF_CHECK.strip())


# ---- The base corpus ----------------------------------------------------------------------------

def documents(spec: ThinkSpec, count: int, seed: int, *, long_share: float,
              self_check_share: float = 0.0) -> Iterator[str]:
  """`count` train-split documents, each long with probability long_share (a long one with a
  self-check with probability self_check_share); all answers right."""
  for name, value in (("long_share", long_share), ("self_check_share", self_check_share)):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
      _bad(name, value, "must be a number in [0, 1]")
  if isinstance(count, bool) or not isinstance(count, int) or count < 0:
    _bad("count", count, "must be an integer >= 0")
  for i in range(count):
    p = problem(spec, "train", seed, i)
    rng = np.random.default_rng([seed, i, 11])
    think = ""
    if rng.random() < long_share:
      think = long_think(p, rng, self_check=bool(rng.random() < self_check_share))
    yield tasks.prompt(p) + tasks.completion(think, p.answer)


def write_corpus(path: str, spec: ThinkSpec, count: int, seed: int, *, long_share: float,
                 self_check_share: float = 0.0) -> int:
  """`documents` as a token file (BOS + bytes + EOS each, as tasks.write_noisy_corpus)."""
  docs = documents(spec, count, seed, long_share=long_share, self_check_share=self_check_share)
  return data.write_tokens(path, (data.encode(d, bos=True, eos=True) for d in docs))


# ---- Per-form figures ---------------------------------------------------------------------------

def form_figures(problems_: list[tasks.Problem], texts_PxN: list[list[str]]) -> dict:
  """Over all P x N responses: `long_share` (of all responses), `long_accuracy` and
  `short_accuracy` (right answers among the well-formed responses of each form; NaN when none),
  `self_check_rate` (share of responses with the phrase)."""
  counts = {"long": [0, 0], "short": [0, 0]}
  total = checked = 0
  for p, texts in zip(problems_, texts_PxN):
    for t in texts:
      total += 1
      checked += self_checks(t) > 0
      f = form(p, t)
      if f is not None:
        counts[f][0] += 1
        counts[f][1] += rewards.is_correct(p, t)
  acc = lambda f: counts[f][1] / counts[f][0] if counts[f][0] else float("nan")
  n = max(total, 1)
  return {"long_share": counts["long"][0] / n, "long_accuracy": acc("long"),
          "short_accuracy": acc("short"), "self_check_rate": checked / n}
