"""Admission: a request checked and turned into a job, the blocks it reserves, and the cached
blocks it reuses (in memory, or read back from the disk tier and verified there).

A job is admitted when the batch has room for its n sequences and the pool can reserve every
block it may need (prompt, the copies of its partial last block for n > 1, and max_tokens per
sequence), counting the cached blocks it reuses as its own. Cold prompts admitted together are
prefilled together; a prompt that needs a block another admitted prompt is computing now waits
for the next group, so it finds that block cached.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import secrets
import warnings
from typing import Callable, Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from moe_jax.serve import kv
from moe_jax.serve.pages import CacheWarning, DiskTier, prefix_hashes
from moe_jax.serve.requests import BadRequest, Request, Usage


@dataclasses.dataclass
class Seq:
  choice: int
  tokens: list[int]
  blocks: list[int]
  hashes: list[str]      # of its full blocks, in order, as far as computed
  computed: int          # tokens whose slots are in the pool
  logprobs: list[float] = dataclasses.field(default_factory=list)
  finish: Optional[str] = None
  text: Optional[str] = None  # the text before a stop string, once one appeared
  routes: list = dataclasses.field(default_factory=list)  # [n, L, K] per computed run of tokens
  top: list = dataclasses.field(default_factory=list)     # {id: log-prob} per sampled token
  sample_logprobs: list[float] = dataclasses.field(default_factory=list)  # sampling.sample's
  stop: Optional[tuple[int, float]] = None  # the stop token that ended it, its sampling log-prob
  hidden: Optional[np.ndarray] = None  # speculative: the main model's hidden state [D] that
  # sampled the last token (spec_decode.py); None until its first decode step


@dataclasses.dataclass
class Job:
  request: Request
  prompt: list[int]
  need: int                       # blocks to reserve with nothing cached
  seed: int = 0                   # the request's, or fresh entropy drawn at submit
  on_token: Optional[Callable] = None
  left: int = 0                   # reserved blocks not yet allocated
  hashes: Optional[list[str]] = None  # of the prompt's full blocks that can be cached
  seqs: list[Seq] = dataclasses.field(default_factory=list)
  usage: Usage = dataclasses.field(default_factory=Usage)
  error: Optional[Exception] = None



class Admission:
  """The engine's admission half (a mixin: Engine holds the pool, pages and queues it uses)."""

  def _disk_tier(self, model_dir: str, name: str) -> DiskTier:
    """disk_dir/<model>/<cache format>/; blocks of other formats beside it are named once."""
    others = sorted(e for e in os.listdir(model_dir) if e != name) \
        if os.path.isdir(model_dir) else []
    if others:
      warnings.warn(f"prefix cache: {model_dir} also holds {', '.join(others[:4])}"
                    f"{' ...' if len(others) > 4 else ''}: this model's blocks in another cache "
                    f"format (storage dtype, block size, tokenizer) or an older layout; this "
                    f"engine reads and writes only {name}", CacheWarning, stacklevel=3)
    return DiskTier(os.path.join(model_dir, name), expected=kv.block_spec(self.pool))

  def _checked(self, requests: Sequence[Request]) -> list[Job]:
    jobs = []
    for r in requests:
      if not isinstance(r, Request):
        raise BadRequest(f"request={r!r}: must be a moe_jax.serve.Request")
      prompt = self._tokens(r.prompt)
      r.check(self.model_cfg.max_seq_len, len(prompt), self.model_cfg.vocab_size)
      bs, P = self.block_size, len(prompt)
      full = P // bs
      if r.n > self.max_batch:
        raise BadRequest(f"n={r.n}: more completions than the engine's batch holds "
                         f"(serve.max_batch={self.max_batch})")
      need = full + r.n * (math.ceil((P + r.max_tokens - 1) / bs) - full)
      if need > self.pages.capacity:
        raise BadRequest(
            f"n={r.n}, max_tokens={r.max_tokens}: the request's {P}-token prompt and "
            f"completions need {need} KV blocks of {bs} tokens; the pool has "
            f"{self.pages.capacity} (serve.num_blocks)")
      jobs.append(Job(r, prompt, need))
    return jobs

  def _tokens(self, prompt) -> list[int]:
    if isinstance(prompt, str):
      try:
        return [int(t) for t in self.tokenizer.encode(prompt)]
      except UnicodeError as e:
        start = getattr(e, "start", 0)
        raise BadRequest(f"prompt={prompt[max(0, start - 8):start + 8]!r}: not valid Unicode "
                         f"text at character {start} ({getattr(e, 'reason', e)}; a lone UTF-16 "
                         "surrogate such as \\ud800 cannot be encoded)") from None
      except Exception as e:  # pylint: disable=broad-except  (any tokenizer's refusal)
        raise BadRequest(f"prompt={prompt[:16]!r}...: the tokenizer refused it "
                         f"({type(e).__name__}: {e})") from None
    V = self.model_cfg.vocab_size
    ids = list(prompt) if isinstance(prompt, (list, tuple, np.ndarray)) else None
    if ids is None or not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool)
                              and 0 <= t < V for t in ids):
      raise BadRequest(f"prompt={(ids or prompt)!r:.60}...: must be text or token ids, "
                       f"integers in [0, {V})")
    return [int(t) for t in ids]

  def _hashes(self, job: Job) -> list[str]:
    """The chained hashes of the prompt's full blocks that may come from the cache (at least the
    last token is computed: its logits give the first sampled token)."""
    if not self.prefix_cache:
      return []
    if job.hashes is None:
      job.hashes = prefix_hashes(self.root, job.prompt, self.block_size,
                                 (len(job.prompt) - 1) // self.block_size)
    return job.hashes

  def _admit_group(self) -> list[Job]:
    """Admits waiting requests in order while they fit, and stops before one that needs a block
    an admitted one computes now: prefilled after this group, it finds that block cached."""
    group, computing = [], set()
    while self.waiting:
      job_id = self.waiting[0]
      job = self.jobs[job_id]
      if computing.intersection(self._hashes(job)) or not self._admit(job):
        break
      self.waiting.popleft()
      self.running[job_id] = job
      group.append(job)
      computing.update(job.hashes[len(job.seqs[0].hashes):] if job.hashes else ())
    return group

  def _admit(self, job: Job) -> bool:
    if sum(j.request.n for j in self.running.values()) + job.request.n > self.max_batch:
      return False
    bs, P, hashes = self.block_size, len(job.prompt), self._hashes(job)
    # The longest run of leading blocks cached, each in memory (referenced now) or on disk
    # (read and verified now, so a bad file shortens the run before anything is reserved).
    found, loaded = [], {}
    for name in hashes:
      block = self.pages.lookup(name)
      if block is None:
        arrays = self.pages.disk.get(name) if self.pages.disk and self.pages.disk.has(name) \
            else None
        if arrays is None:
          break
        loaded[name] = arrays
      found.append((name, block))
    in_memory = [block for _, block in found if block is not None]
    new = job.need - len(in_memory)
    if new > self.pages.available() - self.reserved:
      for block in in_memory:
        self.pages.release(block)
      return False
    self.reserved += new
    job.left = new
    hits = []
    for name, block in found:
      if block is None:
        block = self._allocate(job)
        self.pool = kv.write_block(self.pool, block, kv.block_from_host(self.pool, loaded[name]))
        self.pages.register(block, name)
      hits.append(block)
    job.seqs.append(Seq(0, list(job.prompt), hits, hashes[:len(hits)], len(hits) * bs))
    job.usage.prompt_tokens = P
    job.usage.prompt_cache_hit_tokens = len(hits) * bs
    job.usage.prompt_cache_miss_tokens = P - len(hits) * bs
    return True

  def _allocate(self, job: Job) -> int:
    assert job.left > 0, "allocation beyond the request's reservation"
    job.left -= 1
    self.reserved -= 1
    return self.pages.allocate()

  def cancel(self, job_id: int) -> bool:
    """Drops a request whose caller went away (between steps, from the thread that steps): a
    waiting one leaves the queue; a running one frees its blocks (full ones stay cached) and
    what it had reserved, and no later step computes it. False if it is unknown or finished."""
    job = self.jobs.pop(job_id, None)
    if job is None:
      return False
    if self.running.pop(job_id, None) is not None:
      self._release(job)
    else:
      self.waiting.remove(job_id)
    self.stats["requests_cancelled"] += 1
    return True

  def _release(self, job: Job):
    """Gives back a job's blocks (full ones stay cached) and what it reserved but never used."""
    for seq in job.seqs:
      for block in seq.blocks:
        self.pages.release(block)
    self.reserved -= job.left
    job.left = 0

  def load(self) -> dict:
    """How busy the engine is (for /metrics): requests running and waiting, KV blocks held by
    running sequences, and the pool's usable blocks."""
    return {"running": len(self.running), "waiting": len(self.waiting),
            "blocks_used": self.pages.capacity - self.pages.available(),
            "blocks_total": self.pages.capacity}


def shared_entropy() -> int:
  """Fresh entropy for requests without a seed; every process draws the same (each runs the
  same loop on the same requests and must take the same decisions)."""
  value = secrets.randbits(31)
  if jax.process_count() > 1:
    value = int(multihost_utils.broadcast_one_to_all(np.int32(value)))
  return value


def request_seed(entropy: int, job_id: int) -> int:
  digest = hashlib.sha256(f"{entropy}:{job_id}".encode()).digest()
  return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF
