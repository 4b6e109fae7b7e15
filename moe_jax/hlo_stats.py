"""Collective traffic of a compiled program, read from its optimized HLO text.

`collective_bytes(jax.jit(f).lower(...).compile())` sums, per kind of collective, the bytes of
each collective op's result as the HLO states it. After SPMD partitioning the HLO is the
program of one device, so these are per-device bytes; every device of an SPMD program runs the
same ops, so the whole mesh moves `devices` times as much.

What "result bytes" means per kind (n devices in the group):
  all-to-all          the received buffer; equal to the sent one (1/n of it stays local).
  all-gather          the gathered (n times larger) result.
  reduce-scatter      the scattered (1/n) result.
  all-reduce          the reduced buffer, the same size as its input.
  collective-permute  the received buffer.
  ragged-all-to-all   the output buffer: an upper bound on what is really sent.
These are static counts: an op inside a loop body is counted once, not once per trip. Ops whose
replica groups are all single devices (a psum over a mesh axis of size 1) move nothing and count
zero bytes; `collective_ops` still lists them, with `trivial` set.

Async pairs count once: `all-gather-start`/`-done` (and all-reduce, collective-permute) are
read at the `-done` op, whose result is the collective's output; collectives that XLA wraps in
`async-start` computations (GPU) appear in their wrapped computation and are counted there.
"""
from __future__ import annotations

import re
from typing import Any, NamedTuple, Union

KINDS = ("all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute",
         "ragged-all-to-all")

# Opcodes to count and the kind they report as. `-start` ops are skipped: their results repeat
# the operands (all-gather-start: (input, output) tuple), so the `-done` op is the clean read.
_OPCODES = {**{k: k for k in KINDS},
            "all-gather-done": "all-gather", "all-reduce-done": "all-reduce",
            "collective-permute-done": "collective-permute"}

# Sub-byte and unusual element types; the rest are named <letters><bits> (f32, bf16, s8, u64).
_BITS = {"pred": 8, "token": 0, "f8e4m3fn": 8, "f8e4m3fnuz": 8, "f8e5m2": 8, "f8e5m2fnuz": 8,
         "f8e4m3b11fnuz": 8, "f8e4m3": 8, "f8e3m4": 8, "f8e8m0fnu": 8, "f4e2m1fn": 4}
_ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([^\]]*)\]")
# `%name = <shape> <opcode>(<operands...`: the shape is an array type or a tuple of them.
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\(.*?\)|\S+)\s+([\w\-]+)\(\s*%?([\w.\-]*)(.*)$")
_COMMENT = re.compile(r"/\*.*?\*/")
# Replica groups listed ({{0},{1}}), as an iota ([8,1]<=[8]: 8 groups of 1), or as mesh axes
# (mesh['a'=8,'b'=1] {'b'}: one group per value of the axes not named, spanning those named).
_GROUPS_LISTED = re.compile(r"replica_groups=\{(\{[^}]*\}(?:,\{[^}]*\})*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[\d+,(\d+)\]<=")
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_AXIS = re.compile(r"'([^']+)'\s*=\s*(\d+)")


def _element_bits(dtype: str) -> int:
  if dtype in _BITS:
    return _BITS[dtype]
  match = re.fullmatch(r"[a-z]+(\d+)", dtype)
  if match is None:
    raise ValueError(f"unknown HLO element type {dtype!r}")
  return int(match.group(1))


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape such as `f32[8,4]{1,0}` or `(bf16[2]{0}, s32[])` (sub-byte: rounded
  up per array)."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    count = 1
    for dim in filter(None, dims.split(",")):
      count *= int(dim.strip().lstrip("<="))  # `<=8` is a dynamic dim's bound
    total += -(-count * _element_bits(dtype) // 8)
  return total


def _hlo_text(compiled_or_hlo_text: Union[str, Any]) -> str:
  if isinstance(compiled_or_hlo_text, str):
    return compiled_or_hlo_text
  return compiled_or_hlo_text.as_text()


def _single_device_groups(attributes: str) -> bool:
  listed, iota = _GROUPS_LISTED.search(attributes), _GROUPS_IOTA.search(attributes)
  mesh = _GROUPS_MESH.search(attributes)
  if listed:
    return "," not in listed.group(1).replace("},{", "")
  if iota:
    return iota.group(1) == "1"
  if mesh:
    sizes = {name: int(n) for name, n in _AXIS.findall(mesh.group(1))}
    return all(sizes.get(name, 1) == 1 for name in re.findall(r"'([^']+)'", mesh.group(2)))
  return False  # no groups attribute: one group of every device


class Collective(NamedTuple):
  kind: str       # one of KINDS
  nbytes: int     # per-device result bytes; 0 when trivial
  trivial: bool   # every replica group is one device: nothing moves


def collective_ops(compiled_or_hlo_text: Union[str, Any]) -> list[Collective]:
  """Every collective op, in the order the text lists them."""
  ops, trivial_starts = [], set()
  for line in _hlo_text(compiled_or_hlo_text).splitlines():
    match = _INSTRUCTION.match(_COMMENT.sub("", line))
    if not match:
      continue
    name, shape, opcode, first_operand, rest = match.groups()
    if opcode.endswith("-start") and _single_device_groups(rest):
      trivial_starts.add(name)  # its -done op carries no groups of its own
    if opcode in _OPCODES:
      trivial = (first_operand in trivial_starts if opcode.endswith("-done")
                 else _single_device_groups(rest))
      ops.append(Collective(_OPCODES[opcode], 0 if trivial else shape_bytes(shape), trivial))
  return ops


def collective_bytes(compiled_or_hlo_text: Union[str, Any]) -> dict[str, int]:
  """Per-device result bytes of each kind of collective (every kind in KINDS, zero if absent).

  Takes a `jax.stages.Compiled` (anything with `as_text()`) or HLO text; give it the optimized
  HLO of `.compile()`, since the partitioner inserts the collectives of SPMD code there.
  """
  totals = dict.fromkeys(KINDS, 0)
  for op in collective_ops(compiled_or_hlo_text):
    totals[op.kind] += op.nbytes
  return totals
