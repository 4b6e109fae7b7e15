"""The host side of the paged cache: which pool block holds what, who uses it, and what to reuse.

Block 0 is the null block: unused block-table entries point at it and padded rows write into it,
so it never holds a sequence's data. Blocks 1..N-1 are in one of three states:
  * in use (refcount > 0): in the block tables of running sequences (a shared prefix block is in
    several);
  * cached (refcount 0, with a hash): a full block a finished sequence left behind; it stays
    findable by its hash until it is evicted, least recently used first;
  * free (refcount 0, no hash).

A full block's hash chains its parent's: hash(parent hash, its tokens), with the model's
root (the engine's: the model's fingerprint and the cache's format), so equal hashes mean equal
prefixes on the same weights in the same cache format. Evicted blocks go to the disk tier (if
any), which is keyed by the same hashes and so also serves a restarted process; each file there
carries its hash and checksums, verified on read (DiskTier).
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import tempfile
import warnings
from typing import Callable, Optional, Sequence

import numpy as np

from moe_jax import checksum

NULL_BLOCK = 0


class PoolFull(RuntimeError):
  """No free or evictable block is left: the caller admitted more than it reserved."""


def block_hash(parent: str, tokens: Sequence[int]) -> str:
  text = parent + ":" + ",".join(str(int(t)) for t in tokens)
  return hashlib.sha256(text.encode()).hexdigest()[:32]


def prefix_hashes(root: str, tokens: Sequence[int], block_size: int, blocks: int) -> list[str]:
  """The chained hashes of the first `blocks` full blocks of `tokens`."""
  hashes, parent = [], root
  for i in range(blocks):
    parent = block_hash(parent, tokens[i * block_size:(i + 1) * block_size])
    hashes.append(parent)
  return hashes


class CacheWarning(UserWarning):
  """A disk-tier block that could not be used or written; it is recomputed, never served."""


def _warn(message: str):
  warnings.warn(message, CacheWarning, stacklevel=3)


class DiskTier:
  """Evicted prefix blocks as one .npz per hash under `directory` (written atomically, so a
  crash leaves whole files or none).

  Each file holds the block's arrays, its own hash (`__key__`) and a checksum per array
  (`__checksums__`, moe_jax.checksum). A read is used only when the file opens, names the hash
  it was asked for (a valid block copied over another's fails), every array passes its checksum
  and has the dtype and shape `expected` names ({array: (dtype, shape)}, the pool's own). Any
  other file is reported once (a CacheWarning naming it and the problem), moved into
  `set_aside/` so it is not read again, and the block is recomputed by the caller. Writes that
  fail are reported and skipped: a disk tier never stops the engine.
  """

  def __init__(self, directory: str, expected: Optional[dict] = None,
               report: Callable[[str], None] = _warn):
    self.directory = os.path.abspath(directory)
    if os.path.exists(self.directory) and not os.path.isdir(self.directory):
      raise ValueError(f"serve.disk_dir: {self.directory!r} is a file; it must be a directory")
    os.makedirs(self.directory, exist_ok=True)
    self.expected, self.report = expected, report
    self.reads = self.writes = self.rejected = 0
    self._written: set[str] = set()   # files this process wrote (a missing one is reported)
    self._bad: set[str] = set()       # names whose file failed and could not be moved away

  def _path(self, block: str) -> str:
    return os.path.join(self.directory, block + ".npz")

  def has(self, block: str) -> bool:
    """A file (good or not: get() judges) is there for `block`; a file this process wrote that
    has gone is reported here."""
    if block in self._bad:
      return False
    if os.path.lexists(self._path(block)):
      return True
    if block in self._written:
      self._written.discard(block)
      self.rejected += 1
      self.report(f"prefix cache: {self._path(block)} is missing (written by this process); "
                  "the block is recomputed")
    return False

  def stored(self, block: str) -> bool:
    """A regular file is there for `block` (not yet verified): nothing to write."""
    return block not in self._bad and os.path.isfile(self._path(block))

  def put(self, block: str, arrays: dict[str, np.ndarray]) -> bool:
    """Writes a block unless a good-looking file is there; False (reported) if it could not."""
    path = self._path(block)
    if self.stored(block):
      return True
    if os.path.lexists(path):
      self._set_aside(block, "is not a regular file")
    record = dict(arrays)
    record["__key__"] = np.frombuffer(block.encode(), np.uint8)
    record["__checksums__"] = np.frombuffer(json.dumps(checksum.digests(arrays)).encode(),
                                            np.uint8)
    tmp = None
    try:
      fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
      with os.fdopen(fd, "wb") as f:
        np.savez(f, **record)
      os.replace(tmp, path)
    except OSError as e:
      if tmp is not None and os.path.lexists(tmp):
        with contextlib.suppress(OSError):
          os.remove(tmp)
      self.report(f"prefix cache: could not write {path} ({type(e).__name__}: {e}); the block "
                  "stays in memory only")
      return False
    self._bad.discard(block)
    self._written.add(block)
    self.writes += 1
    return True

  def get(self, block: str) -> Optional[dict[str, np.ndarray]]:
    """The block's verified arrays, or None (reported and set aside when a file was there)."""
    path = self._path(block)
    if block in self._bad:
      return None
    try:
      with np.load(path, allow_pickle=False) as stored:
        arrays = {name: stored[name] for name in stored.files}
    except FileNotFoundError:
      self.has(block)  # reports it if this process wrote it
      return None
    except Exception as e:  # pylint: disable=broad-except  (zip, OSError, EOF, pickle: all damage)
      self._set_aside(block, f"cannot be read ({type(e).__name__}: {e})")
      return None
    why = self._problem(block, arrays)
    if why is not None:
      self._set_aside(block, why)
      return None
    self.reads += 1
    return arrays

  def _problem(self, block: str, arrays: dict) -> Optional[str]:
    key, sums = arrays.pop("__key__", None), arrays.pop("__checksums__", None)
    if key is None or sums is None:
      return "has no key or checksums (written by an older version, or not a cache block)"
    try:
      key, sums = bytes(key).decode(), json.loads(bytes(sums).decode())
    except (UnicodeDecodeError, ValueError):
      return "has an unreadable key or checksum record"
    if key != block:
      return f"holds block {key} (a file copied over another's)"
    why = checksum.problem(arrays, sums) if isinstance(sums, dict) else "bad checksum record"
    if why is not None or self.expected is None:
      return why
    for name, (dtype, shape) in self.expected.items():
      got = arrays.get(name)
      if got is None or got.dtype != np.dtype(dtype) or got.shape != tuple(shape):
        found = "nothing" if got is None else f"{got.dtype}{list(got.shape)}"
        return (f"holds {found} for {name!r} where this engine's cache has "
                f"{np.dtype(dtype)}{list(shape)} (another cache format)")
    extra = sorted(set(arrays) - set(self.expected))
    return f"holds an array {extra[0]!r} this engine's cache has not" if extra else None

  def _set_aside(self, block: str, why: str):
    """Moves a bad file into set_aside/ (or, if that fails, never reads it again)."""
    path, aside = self._path(block), os.path.join(self.directory, "set_aside")
    target = os.path.join(aside, f"{block}.npz")
    try:
      os.makedirs(aside, exist_ok=True)
      n = 1
      while os.path.lexists(target):
        target, n = os.path.join(aside, f"{block}.{n}.npz"), n + 1
      os.replace(path, target)
      where = f"moved to {target}"
    except OSError:
      self._bad.add(block)
      where = "left in place (it could not be moved) and not read again"
    self._written.discard(block)
    self.rejected += 1
    self.report(f"prefix cache: {path} {why}; {where}; the block is recomputed")


class Pages:
  """Refcounts, the hash table of cached blocks and their LRU order, for a pool of N blocks.

  read_block(b) -> {name: array} fetches a block's data for the disk tier on eviction.
  """

  def __init__(self, num_blocks: int, *, disk: Optional[DiskTier] = None,
               read_block: Optional[Callable[[int], dict]] = None):
    self.num_blocks = num_blocks
    self.ref = [0] * num_blocks
    self.hash_of: list[Optional[str]] = [None] * num_blocks
    self.by_hash: dict[str, int] = {}
    self.free = collections.deque(range(1, num_blocks))
    self.lru: collections.OrderedDict[int, None] = collections.OrderedDict()
    self.disk, self._read_block = disk, read_block
    self.evictions = 0

  @property
  def capacity(self) -> int:
    return self.num_blocks - 1

  def available(self) -> int:
    """Blocks that can be handed out now: free ones and cached ones nobody uses."""
    return len(self.free) + len(self.lru)

  def allocate(self) -> int:
    if self.free:
      block = self.free.popleft()
    elif self.lru:
      block, _ = self.lru.popitem(last=False)
      self._evict(block)
    else:
      raise PoolFull(f"all {self.capacity} blocks of the KV pool are in use")
    self.ref[block] = 1
    return block

  def _evict(self, block: int):
    name = self.hash_of[block]
    if self.disk is not None and self._read_block is not None and not self.disk.stored(name):
      self.disk.put(name, self._read_block(block))  # a failed write is reported, not raised
    del self.by_hash[name]
    self.hash_of[block] = None
    self.evictions += 1

  def lookup(self, name: str) -> Optional[int]:
    """The block cached under `name`, now referenced once more; None if it is not in memory."""
    block = self.by_hash.get(name)
    if block is not None:
      self.share(block)
    return block

  def share(self, block: int):
    if self.ref[block] == 0:
      del self.lru[block]
    self.ref[block] += 1

  def release(self, block: int):
    self.ref[block] -= 1
    assert self.ref[block] >= 0, f"block {block} released more often than taken"
    if self.ref[block] == 0:
      if self.hash_of[block] is None:
        self.free.append(block)
      else:
        self.lru[block] = None  # most recently used last

  def register(self, block: int, name: str):
    """Makes a full, computed block findable; a block whose twin is already cached stays
    private (it is freed, not cached, when released)."""
    if name in self.by_hash or self.hash_of[block] is not None:
      return
    self.hash_of[block] = name
    self.by_hash[name] = block

  def flush_to_disk(self):
    """Writes every cached block to the disk tier (before the process ends)."""
    if self.disk is None or self._read_block is None:
      return
    for name, block in self.by_hash.items():
      if not self.disk.stored(name):
        self.disk.put(name, self._read_block(block))
