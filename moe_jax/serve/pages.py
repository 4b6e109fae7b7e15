"""The host side of the paged cache: which pool block holds what, who uses it, and what to reuse.

Block 0 is the null block: unused block-table entries point at it and padded rows write into it,
so it never holds a sequence's data. Blocks 1..N-1 are in one of three states:
  * in use (refcount > 0): in the block tables of running sequences (a shared prefix block is in
    several);
  * cached (refcount 0, with a hash): a full block a finished sequence left behind; it stays
    findable by its hash until it is evicted, least recently used first;
  * free (refcount 0, no hash).

A full block's hash chains its parent's: hash(parent hash, its tokens), with the model's
fingerprint as the root, so equal hashes mean equal prefixes on the same weights. Evicted blocks
go to the disk tier (if any), which is keyed by the same hashes and so also serves a restarted
process.
"""
from __future__ import annotations

import collections
import hashlib
import os
import tempfile
from typing import Callable, Optional, Sequence

import numpy as np

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


class DiskTier:
  """Evicted prefix blocks as one .npz per hash under `directory` (written atomically, so a
  crash leaves whole files or none)."""

  def __init__(self, directory: str):
    self.directory = os.path.abspath(directory)
    os.makedirs(self.directory, exist_ok=True)
    self.reads = self.writes = 0

  def _path(self, block: str) -> str:
    return os.path.join(self.directory, block + ".npz")

  def has(self, block: str) -> bool:
    return os.path.isfile(self._path(block))

  def put(self, block: str, arrays: dict[str, np.ndarray]):
    if self.has(block):
      return
    fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
    try:
      with os.fdopen(fd, "wb") as f:
        np.savez(f, **arrays)
      os.replace(tmp, self._path(block))
    except BaseException:
      if os.path.exists(tmp):
        os.remove(tmp)
      raise
    self.writes += 1

  def get(self, block: str) -> Optional[dict[str, np.ndarray]]:
    try:
      with np.load(self._path(block)) as stored:
        arrays = {name: stored[name] for name in stored.files}
    except (OSError, ValueError, EOFError):  # missing, or torn by something outside us
      return None
    self.reads += 1
    return arrays


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
    if self.disk is not None and self._read_block is not None and not self.disk.has(name):
      self.disk.put(name, self._read_block(block))
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
      if not self.disk.has(name):
        self.disk.put(name, self._read_block(block))
