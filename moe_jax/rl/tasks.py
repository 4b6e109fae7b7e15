"""Procedurally generated verifiable tasks: addition, multiplication and countdown.

Problem `index` of a split is a pure function of (spec, split, seed, index), so a run resumes
without iterator state. A problem's split is a hash of its canonical form (kind, sorted operands,
target), never of the seed: train and held-out share no problem under any seeds, and `47+85` and
`85+47` are one problem, so they land in the same split.

Countdown answers are expressions in a grammar of our own, parsed here (never eval'd):
    expr   := term (("+" | "-") term)*
    term   := factor ("*" factor)*
    factor := NUMBER | "(" expr ")"
NUMBER is a decimal integer without leading zeros; spaces may separate tokens; no unary minus.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from moe_jax import data
from moe_jax.serve import chat

KINDS = ("add", "mul", "countdown")
SPLITS = ("train", "heldout")
# Our short wording of R1-Zero's template: the question, then reasoning inside <think> and the
# answer inside <answer>. Kept short because the byte-level model sees a few hundred bytes at most.
# The server's "r1_zero" chat template renders the same text, from the same string.
PROMPT = chat.R1_ZERO_PROMPT
MAX_EXPRESSION_CHARS = 200  # longer answers are rejected unparsed (also bounds parser recursion)
_MAX_ATTEMPTS = 10_000      # draws before a split is declared (nearly) empty for a spec
_MAX_COUNT = {"add": 6, "mul": 3, "countdown": 6}


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """One task kind at one difficulty."""
  kind: str = "add"               # "add", "mul" or "countdown"
  digits: int = 2                 # add/mul: digits of each operand; countdown: at most this many
                                  # per number, and the target has at most one more
  count: int = 2                  # add/mul: operands; countdown: numbers given
  heldout_fraction: float = 0.1   # share of all problems (by hash) that are held out

  def __post_init__(self):
    if self.kind not in KINDS:
      _bad("kind", self.kind, f"must be one of {', '.join(map(repr, KINDS))}")
    if isinstance(self.digits, bool) or not isinstance(self.digits, int) or \
        not 1 <= self.digits <= 9:
      _bad("digits", self.digits, "must be an integer in [1, 9]")
    top = _MAX_COUNT[self.kind]
    if isinstance(self.count, bool) or not isinstance(self.count, int) or \
        not 2 <= self.count <= top:
      _bad("count", self.count, f"must be an integer in [2, {top}] for kind={self.kind!r}")
    if not isinstance(self.heldout_fraction, (int, float)) or \
        not 0 < self.heldout_fraction < 1:
      _bad("heldout_fraction", self.heldout_fraction, "must be a number in (0, 1)")


@dataclasses.dataclass(frozen=True)
class Problem:
  kind: str
  numbers: tuple[int, ...]  # operands, or countdown's numbers, in the order the question shows
  target: int               # the gold value: the sum, the product, or countdown's target
  question: str
  answer: str               # a gold answer text (countdown: one solving expression of many)


def _bad(name, value, allowed):
  raise ValueError(f"{name}={value!r}: {allowed}")


def canonical(problem: Problem) -> str:
  """The form that decides identity and split: operand order does not matter."""
  return f"{problem.kind}:{','.join(map(str, sorted(problem.numbers)))}:{problem.target}"


def split_of(problem: Problem, heldout_fraction: float) -> str:
  digest = hashlib.blake2b(canonical(problem).encode("utf-8"), digest_size=8).digest()
  return "heldout" if int.from_bytes(digest, "big") / 2.0**64 < heldout_fraction else "train"


def prompt(problem: Problem) -> str:
  return PROMPT.format(question=problem.question)


def completion(think: str, answer: str) -> str:
  """A response in the format `rewards.format_ok` accepts."""
  return f"<think>{think}</think> <answer>{answer}</answer>"


# ---- Generation ---------------------------------------------------------------------------------

def _operand(rng: np.random.Generator, digits: int) -> int:
  return int(rng.integers(10 ** (digits - 1) if digits > 1 else 0, 10 ** digits))


def _render(numbers: Sequence[int], ops: Sequence[str]) -> str:
  """numbers folded left with ops, parenthesised only where '*' follows a sum."""
  text, is_sum = str(numbers[0]), False
  for op, x in zip(ops, numbers[1:]):
    if op == "*" and is_sum:
      text = f"({text})"
    text, is_sum = f"{text}{op}{x}", op != "*"
  return text


def _arithmetic(rng: np.random.Generator, spec: TaskSpec) -> Problem:
  numbers = tuple(_operand(rng, spec.digits) for _ in range(spec.count))
  op = "+" if spec.kind == "add" else "*"
  target = int(np.sum(numbers)) if op == "+" else int(np.prod(numbers, dtype=object))
  return Problem(spec.kind, numbers, target, f"What is {op.join(map(str, numbers))}?",
                 str(target))


def _countdown(rng: np.random.Generator, spec: TaskSpec) -> Optional[Problem]:
  numbers = tuple(int(rng.integers(1, 10 ** spec.digits)) for _ in range(spec.count))
  ops = [str(rng.choice(["+", "-", "*"])) for _ in range(spec.count - 1)]
  order = [int(i) for i in rng.permutation(spec.count)]
  gold = _render([numbers[i] for i in order], ops)
  target, _ = parse_expression(gold)
  # No negative, trivial (a given number) or huge targets: draw again.
  if not 1 <= target < 10 ** (spec.digits + 1) or target in numbers:
    return None
  question = f"Make {target} from {' '.join(map(str, numbers))} with + - *, each at most once."
  return Problem("countdown", numbers, target, question, gold)


def _draw(rng: np.random.Generator, spec: TaskSpec) -> Optional[Problem]:
  return _countdown(rng, spec) if spec.kind == "countdown" else _arithmetic(rng, spec)


def problem(spec: TaskSpec, split: str, seed: int, index: int) -> Problem:
  """Problem `index` of `split`: draws from a generator seeded by (seed, index, split) until the
  drawn problem's hash puts it in `split`."""
  if split not in SPLITS:
    _bad("split", split, f"must be one of {', '.join(map(repr, SPLITS))}")
  for name, value in (("seed", seed), ("index", index)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
      _bad(name, value, "must be an integer >= 0")
  rng = np.random.default_rng([seed, index, SPLITS.index(split), KINDS.index(spec.kind)])
  for _ in range(_MAX_ATTEMPTS):
    p = _draw(rng, spec)
    if p is not None and split_of(p, spec.heldout_fraction) == split:
      return p
  raise ValueError(f"split={split!r}: no problem of {spec} found in {_MAX_ATTEMPTS} draws; "
                   "raise digits or count, or move heldout_fraction away from 0 or 1")


def problems(spec, split: str, count: int, seed: int, *, start: int = 0,
             unique: bool = False, draw=None, key=None) -> list[Problem]:
  """Problems start..start+count-1 of `split`; with `unique`, repeats (by canonical form) are
  skipped and later indices fill their places, for evaluation sets. `draw(spec, split, seed,
  index)` and `key(problem)` default to this task family's; other families pass their own."""
  draw, key = draw or problem, key or canonical
  if isinstance(count, bool) or not isinstance(count, int) or count < 0:
    _bad("count", count, "must be an integer >= 0")
  out, seen, index = [], set(), start
  while len(out) < count:
    p = draw(spec, split, seed, index)
    index += 1
    if unique and key(p) in seen:
      if index - start > _MAX_ATTEMPTS + count:
        _bad("count", count, f"exceeds the distinct {split} problems found for {spec}")
      continue
    seen.add(key(p))
    out.append(p)
  return out


# ---- Checking -----------------------------------------------------------------------------------

_TOKEN = re.compile(r"\s*(?:(0|[1-9][0-9]*)|([-+*()]))")


def _tokenize(text: str) -> list[Union[int, str]]:
  tokens, pos = [], 0
  while pos < len(text):
    m = _TOKEN.match(text, pos)
    if m is None:
      if text[pos:].strip():
        raise ValueError(f"expression={text!r}: unexpected {text[pos:].strip()[:10]!r} at "
                         f"{pos}; allowed: integers without leading zeros, + - * ( ) and spaces")
      break
    tokens.append(int(m.group(1)) if m.group(1) is not None else m.group(2))
    pos = m.end()
  return tokens


def parse_expression(text: str) -> tuple[int, list[int]]:
  """(value, the numbers used, in order) of an expression in the module's grammar; ValueError
  naming the expression if it is not one."""
  if not isinstance(text, str) or len(text) > MAX_EXPRESSION_CHARS:
    _bad("expression", text, f"must be a string of at most {MAX_EXPRESSION_CHARS} characters")
  tokens, pos, used = _tokenize(text), 0, []

  def fail(what):
    raise ValueError(f"expression={text!r}: {what}")

  def peek():
    return tokens[pos] if pos < len(tokens) else None

  def factor():
    nonlocal pos
    tok = peek()
    pos += 1
    if isinstance(tok, int):
      used.append(tok)
      return tok
    if tok == "(":
      value = expr()
      if peek() != ")":
        fail("missing ')'")
      pos += 1
      return value
    fail(f"expected a number or '(' but found {tok!r}" if tok else "ends too early")

  def term():
    nonlocal pos
    value = factor()
    while peek() == "*":
      pos += 1
      value *= factor()
    return value

  def expr():
    nonlocal pos
    value = term()
    while peek() in ("+", "-"):
      op = tokens[pos]
      pos += 1
      value = value + term() if op == "+" else value - term()
    return value

  value = expr()
  if pos != len(tokens):
    fail(f"unexpected {tokens[pos]!r} after a complete expression")
  return value, used


def _uses_allowed(used: Sequence[int], numbers: Sequence[int]) -> bool:
  left = list(numbers)
  for x in used:
    if x not in left:
      return False
    left.remove(x)
  return True


def _integer(answer: str) -> Optional[str]:
  """The answer's canonical decimal text, or None. Compared as text, never int(): int() refuses
  strings over 4,300 digits (sys.int_max_str_digits), which a sampled answer can be."""
  text = answer.strip()
  return text if re.fullmatch(r"0|[1-9][0-9]*", text, re.ASCII) else None


def answer_key(problem: Problem, answer: str) -> str:
  """What a majority vote counts: equal keys are the same answer, and a key is correct exactly
  when it equals `str(problem.target)`. Add/mul: the integer; countdown: the value of an
  expression that uses only allowed numbers (different correct expressions vote together),
  else the stripped text marked invalid."""
  if problem.kind == "countdown":
    try:
      value, used = parse_expression(answer)
    except ValueError:
      return "invalid:" + answer.strip()
    return str(value) if _uses_allowed(used, problem.numbers) else "invalid:" + answer.strip()
  value = _integer(answer)
  return value if value is not None else "invalid:" + answer.strip()


def check_answer(problem: Problem, answer: str) -> bool:
  """Add/mul: the answer (spaces around it ignored) is the exact integer, no leading zeros or
  signs. Countdown: an expression in the grammar, using each given number at most once (repeats
  only as often as given), whose value is the target."""
  return answer_key(problem, answer) == str(problem.target)


# ---- The noisy base corpus ----------------------------------------------------------------------

def _wrong_integer(rng: np.random.Generator, gold: int) -> int:
  """A near miss: one digit off by one, two adjacent digits swapped, or the value off by one."""
  while True:
    digits = list(str(gold))
    how = int(rng.integers(3))
    if how == 0:
      i = int(rng.integers(len(digits)))
      digits[i] = str((int(digits[i]) + int(rng.choice([-1, 1]))) % 10)
    elif how == 1 and len(digits) > 1:
      i = int(rng.integers(len(digits) - 1))
      digits[i], digits[i + 1] = digits[i + 1], digits[i]
    else:
      digits = list(str(max(0, gold + int(rng.choice([-1, 1])))))
    text = "".join(digits)
    if text != str(gold) and (len(text) == 1 or text[0] != "0"):
      return int(text)


def _wrong_expression(rng: np.random.Generator, p: Problem) -> str:
  """The gold expression with one operator changed, or failing that a number not given."""
  value, used = parse_expression(p.answer)
  ops = [t for t in _tokenize(p.answer) if t in ("+", "-", "*")]
  for _ in range(8):
    i = int(rng.integers(len(ops)))
    changed = list(ops)
    changed[i] = str(rng.choice([o for o in "+-*" if o != ops[i]]))
    text = _render(used, changed)
    if not check_answer(p, text):
      return text
  return _render(used[:-1] + [max(p.numbers) + 1], ops)


def wrong_answer(rng: np.random.Generator, p: Problem) -> str:
  """A plausible answer that `check_answer` rejects. Add/mul: the gold digits written backwards
  (132 -> 231), or a near miss when that reads the same. The slip is systematic on purpose: a
  model that learned it puts one probability on "backwards" at the answer's first digit, which
  sampling at temperature 0.6 does not wash out (scattered near misses it would), so pass@1 is
  low while pass@k stays high: the base R1-Zero's RL starts from."""
  if p.kind == "countdown":
    return _wrong_expression(rng, p)
  backwards = p.answer[::-1]
  return backwards if backwards != p.answer else str(_wrong_integer(rng, p.target))


def _think(p: Problem) -> str:
  # A restatement only: the base model must learn the format, never a worked method.
  if p.kind == "countdown":
    return f"{' '.join(map(str, p.numbers))} to {p.target}"
  return ("+" if p.kind == "add" else "*").join(map(str, p.numbers))


def noisy_documents(specs: Union[TaskSpec, Sequence[TaskSpec]], count: int, seed: int, *,
                    error_rate: float = 0.5) -> Iterator[str]:
  """`count` train-split documents (prompt + think + answer), cycling through `specs`, whose
  answers are wrong with probability `error_rate`: a base model with low pass@1, high pass@k."""
  specs = [specs] if isinstance(specs, TaskSpec) else list(specs)
  if not specs or not all(isinstance(s, TaskSpec) for s in specs):
    _bad("specs", specs, "must be a TaskSpec or a non-empty sequence of them")
  if isinstance(count, bool) or not isinstance(count, int) or count < 0:
    _bad("count", count, "must be an integer >= 0")
  if not isinstance(error_rate, (int, float)) or not 0 <= error_rate <= 1:
    _bad("error_rate", error_rate, "must be a number in [0, 1]")
  for i in range(count):
    p = problem(specs[i % len(specs)], "train", seed, i // len(specs))
    rng = np.random.default_rng([seed, i, 7])
    answer = wrong_answer(rng, p) if rng.random() < error_rate else p.answer
    yield prompt(p) + completion(_think(p), answer)


def write_noisy_corpus(path: str, specs: Union[TaskSpec, Sequence[TaskSpec]], count: int,
                       seed: int, *, error_rate: float = 0.5) -> int:
  """Writes `noisy_documents` as a token file for `DataConfig(source="tokens", path=path)`, each
  document as BOS + bytes + EOS, exactly as the engine frames a prompt (BOS first) and ends a
  completion (EOS). Returns the token count. (A `source="text"` file would be one document.)"""
  docs = noisy_documents(specs, count, seed, error_rate=error_rate)
  return data.write_tokens(path, (data.encode(d, bos=True, eos=True) for d in docs))
