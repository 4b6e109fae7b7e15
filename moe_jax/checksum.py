"""Checksums of arrays written to disk, verified when they are read back.

One mechanism for everything the project reads back: checkpoints record a digest per array at
save time, disk-tier prefix-cache blocks carry one per array. A digest covers dtype, shape and
bytes, so a file of the right shapes and wrong values fails, and so does a cast.

CRC-32 (zlib) is the hash: it catches every burst of up to 32 flipped bits and ~1 - 2^-32 of
everything else, which is what bit rot and torn writes look like, at memory speed. It is not a
defence against someone forging a file; nothing here is.
"""
from __future__ import annotations

import os
import zlib
from typing import Mapping, Optional

import numpy as np

ALGORITHM = "crc32"


def digest(array) -> str:
  """'crc32:xxxxxxxx' of the array's dtype, shape and C-order bytes."""
  a = np.ascontiguousarray(np.asarray(array))
  header = f"{a.dtype.str}|{a.shape}".encode()
  crc = zlib.crc32(header)
  # Viewed as bytes: ml_dtypes' bfloat16 / float8 have no buffer format of their own.
  crc = zlib.crc32(a.reshape(-1).view(np.uint8), crc)
  return f"{ALGORITHM}:{crc & 0xFFFFFFFF:08x}"


def file_digest(path: str, chunk: int = 1 << 22) -> str:
  """'crc32:xxxxxxxx' of a file's size and bytes, read in chunks."""
  crc = zlib.crc32(f"file|{os.path.getsize(path)}".encode())
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(chunk), b""):
      crc = zlib.crc32(block, crc)
  return f"{ALGORITHM}:{crc & 0xFFFFFFFF:08x}"


def digests(arrays: Mapping[str, object]) -> dict[str, str]:
  return {name: digest(value) for name, value in arrays.items()}


def problem(arrays: Mapping[str, object], expected: Mapping[str, str]) -> Optional[str]:
  """None when `arrays` are exactly what `expected` recorded; else one phrase naming the first
  array that is missing, extra or differs."""
  missing = sorted(set(expected) - set(arrays))
  if missing:
    return f"array {missing[0]!r} is missing"
  extra = sorted(set(arrays) - set(expected))
  if extra:
    return f"array {extra[0]!r} was not recorded at save time"
  for name in sorted(expected):
    got = digest(arrays[name])
    if got != expected[name]:
      return f"array {name!r} fails its checksum (recorded {expected[name]}, read {got})"
  return None
