"""The inference engine: continuous batching over a paged KV pool with a prefix cache.

  engine = Engine(params, moe_state, model_cfg, moe_cfg, num_blocks=512)
  completions = engine.generate([Request("def f(", max_tokens=32, n=4, temperature=0.6)])

Each `step()`:
  1. admits waiting requests, first come first served, while the batch has room for their n
     sequences and the pool can reserve every block they may need (prompt, the copies of its
     partial last block for n > 1, and max_tokens per sequence). A request larger than the whole
     pool is refused at `submit`; one that does not fit now waits. Reserving up front means a
     running sequence never finds the pool full, so no sequence's blocks are ever taken from it.
  2. prefills each admitted prompt once: the longest run of its full blocks already cached (in
     memory, or in the disk tier) is reused and only the rest is computed, in chunks; its n
     sequences then share the prompt's full blocks and get a copy of the partial last one.
  3. runs one decode step for every running sequence, batched (the batch padded to a power of
     two: a few compiled shapes serve every mix of requests).
  4. retires finished sequences: their full blocks stay cached (findable by hash), the rest free.

The model is the decoder's cached forward (`generate.forward_cached`), so any loaded model serves:
trained here or a DeepSeek-V3-format checkpoint from `moe_jax.interop`. With a mesh, every call
runs inside it (expert parallelism included); the batch is padded to a multiple of the mesh's
token shards. MoE layers serve dropless (capacity_factor None): a token's experts never depend on
what else is in the batch.

`record_routes=True` (RL router replay) keeps the experts every computed position chose in each
MoE block of the main model: `Choice.routes` [prompt + completion tokens, L, K] int32, -1 on a
last token never fed to the model. It turns the prefix cache off, since blocks served from it
would come without their routes; a request's n completions still share one prefill.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import math
import os
from typing import Callable, Optional, Sequence

import jax
import numpy as np
from jax._src import config as jax_config  # the thread-local setting has no public handle
from jax.experimental import multihost_utils

from moe_jax import data, sharding
from moe_jax.config import ModelConfig, MoEConfig
from moe_jax.serve import kv
from moe_jax.serve.pages import NULL_BLOCK, DiskTier, Pages, block_hash, prefix_hashes
from moe_jax.serve.requests import BadRequest, Choice, Completion, Request, Usage
from moe_jax.serve.sampling import sample

MIN_PREFILL_BUCKET = 16


class ByteTokenizer:
  """moe_jax's byte tokenizer: a prompt starts with BOS; EOS ends a completion."""
  eos_id = data.EOS

  def encode(self, text: str) -> list[int]:
    return [int(t) for t in data.encode(text, bos=True)]

  def decode(self, ids: Sequence[int]) -> str:
    return data.decode(ids)


def _pow2(n: int, floor: int = 1) -> int:
  return max(floor, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def fingerprint(params, moe_state, model_cfg: ModelConfig) -> str:
  """Names the weights (config, shapes and a sample of every array): the prefix cache's root, so
  a disk tier never serves one model's cache to another."""
  h = hashlib.sha256(repr(model_cfg).encode())
  for path, leaf in jax.tree_util.tree_leaves_with_path((params, moe_state)):
    h.update(jax.tree_util.keystr(path).encode() + str(leaf.shape).encode())
    h.update(np.asarray(leaf.reshape(-1)[:64], np.float32).tobytes())
  return h.hexdigest()[:16]


@dataclasses.dataclass
class _Seq:
  choice: int
  tokens: list[int]
  blocks: list[int]
  hashes: list[str]      # of its full blocks, in order, as far as computed
  computed: int          # tokens whose slots are in the pool
  logprobs: list[float] = dataclasses.field(default_factory=list)
  finish: Optional[str] = None
  text: Optional[str] = None  # the text before a stop string, once one appeared
  routes: list = dataclasses.field(default_factory=list)  # [n, L, K] per computed run of tokens
  sample_logprobs: list[float] = dataclasses.field(default_factory=list)  # sampling.sample's
  stop: Optional[tuple[int, float]] = None  # the stop token that ended it, its sampling log-prob


@dataclasses.dataclass
class _Job:
  request: Request
  prompt: list[int]
  need: int                       # blocks to reserve with nothing cached
  on_token: Optional[Callable] = None
  left: int = 0                   # reserved blocks not yet allocated
  seqs: list[_Seq] = dataclasses.field(default_factory=list)
  usage: Usage = dataclasses.field(default_factory=Usage)


class Engine:
  """See the module docstring. `stats` counts prefilled and cached prompt tokens, decode steps
  and the shapes compiled."""

  def __init__(self, params, moe_state, model_cfg: ModelConfig, moe_cfg: MoEConfig, *,
               num_blocks: int = 256, block_size: int = 16, max_batch: int = 16,
               prefill_chunk: int = 512, prefix_cache: bool = True,
               disk_dir: Optional[str] = None, fp8_cache: bool = False, mesh=None,
               tokenizer=None, record_routes: bool = False):
    for name, value, low in (("num_blocks", num_blocks, 2), ("block_size", block_size, 1),
                             ("max_batch", max_batch, 1), ("prefill_chunk", prefill_chunk, 1)):
      if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"serve.{name}={value!r}: must be an integer >= {low}")
    self.params, self.moe_state, self.model_cfg = params, moe_state, model_cfg
    self.moe_cfg = dataclasses.replace(moe_cfg, capacity_factor=None)
    self.block_size, self.max_batch, self.prefill_chunk = block_size, max_batch, prefill_chunk
    if not isinstance(record_routes, bool):
      raise ValueError(f"serve.record_routes={record_routes!r}: must be True or False")
    self.record_routes = record_routes
    self.prefix_cache, self.mesh = prefix_cache and not record_routes, mesh
    self.tokenizer = tokenizer or ByteTokenizer()
    self.min_batch = sharding.shard_count(mesh, "batch") if mesh is not None else 1
    self.pool = kv.init_pool(model_cfg, num_blocks, block_size, fp8_cache)
    if mesh is not None:
      replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
      self.pool = jax.device_put(self.pool, replicated)
    self.root = fingerprint(params, moe_state, model_cfg)
    disk = DiskTier(os.path.join(disk_dir, self.root)) if disk_dir and self.prefix_cache else None
    self.pages = Pages(num_blocks, disk=disk, read_block=lambda b: kv.read_block(self.pool, b))
    self.reserved = 0
    self.waiting: collections.deque[int] = collections.deque()
    self.running: dict[int, _Job] = {}
    self.jobs: dict[int, _Job] = {}
    self._next_id = 0
    self.stats = collections.Counter()
    self.shapes: set[tuple] = set()

  # ------------------------------------------------------------------------- the public calls

  def generate(self, requests: Sequence[Request]) -> list[Completion]:
    """Completions of `requests`, in order (all are checked before any work starts)."""
    self._checked(requests)
    ids = [self.submit(r) for r in requests]
    done: dict[int, Completion] = {}
    while len(done) < len(ids):
      done.update(self.step())
    return [done[i] for i in ids]

  def submit(self, request: Request, on_token: Optional[Callable] = None) -> int:
    """Queues a request (BadRequest if it cannot be served); returns its id. on_token(choice,
    token_id, logprob) is called for each sampled token, before stop strings are looked for: a
    streaming caller holds back text that a stop string may still cut. Usage counts every
    generated token, the cut ones included (they were computed)."""
    job = self._checked([request])[0]
    job.on_token = on_token
    job_id, self._next_id = self._next_id, self._next_id + 1
    self.jobs[job_id] = job
    self.waiting.append(job_id)
    return job_id

  def has_work(self) -> bool:
    return bool(self.waiting or self.running)

  def step(self) -> dict[int, Completion]:
    """One round of admission, prefill and decode; returns the requests that finished."""
    # JAX's persistent compilation cache crashed (SIGSEGV) writing the engine's step executable
    # in CI, twice, on the main thread and on the server's (BUILD_NOTES.md, "Serving engine"):
    # what the engine compiles is not written there (a thread-local setting; reads still hit).
    with jax_config.persistent_cache_min_compile_time_secs(float("inf")):
      return self._step()

  def _step(self) -> dict[int, Completion]:
    # Admitted and prefilled one at a time: a prompt finds the blocks the one before it cached.
    while self.waiting and self._admit(self.waiting[0]):
      job_id = self.waiting.popleft()
      self.running[job_id] = self.jobs[job_id]
      self._prefill(self.jobs[job_id])
    live = [s for job in self.running.values() for s in job.seqs if s.finish is None]
    if live:
      self._decode(live)
    finished = {}
    for job_id, job in list(self.running.items()):
      if all(s.finish is not None for s in job.seqs):
        finished[job_id] = self._retire(job)
        del self.running[job_id], self.jobs[job_id]
    return finished

  def cancel(self, job_id: int) -> bool:
    """Drops a request whose caller went away (between steps, from the thread that steps): a
    waiting one leaves the queue; a running one frees its blocks (full ones stay cached) and
    what it had reserved, and no later step computes it. False if it is unknown or finished."""
    job = self.jobs.pop(job_id, None)
    if job is None:
      return False
    if self.running.pop(job_id, None) is not None:
      for seq in job.seqs:
        for block in seq.blocks:
          self.pages.release(block)
      self.reserved -= job.left
      job.left = 0
    else:
      self.waiting.remove(job_id)
    self.stats["requests_cancelled"] += 1
    return True

  def load(self) -> dict:
    """How busy the engine is (for /metrics): requests running and waiting, KV blocks held by
    running sequences, and the pool's usable blocks."""
    return {"running": len(self.running), "waiting": len(self.waiting),
            "blocks_used": self.pages.capacity - self.pages.available(),
            "blocks_total": self.pages.capacity}

  def close(self):
    """Writes the cached prefix blocks to the disk tier, so a new process finds them."""
    self.pages.flush_to_disk()

  # ------------------------------------------------------------------------- admission

  def _checked(self, requests: Sequence[Request]) -> list[_Job]:
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
      jobs.append(_Job(r, prompt, need))
    return jobs

  def _tokens(self, prompt) -> list[int]:
    if isinstance(prompt, str):
      return self.tokenizer.encode(prompt)
    ids = list(prompt)
    V = self.model_cfg.vocab_size
    if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) and 0 <= t < V
               for t in ids):
      raise BadRequest(f"prompt={ids[:8]!r}...: token ids must be integers in [0, {V})")
    return [int(t) for t in ids]

  def _admit(self, job_id: int) -> bool:
    job = self.jobs[job_id]
    if sum(j.request.n for j in self.running.values()) + job.request.n > self.max_batch:
      return False
    bs, P = self.block_size, len(job.prompt)
    # At least the prompt's last token is computed: its logits give the first sampled token.
    hashes = prefix_hashes(self.root, job.prompt, bs, (P - 1) // bs) if self.prefix_cache else []
    hits = []
    for name in hashes:
      block = self.pages.lookup(name)
      if block is None:
        break
      hits.append(block)
    on_disk = 0
    if self.pages.disk is not None:
      while len(hits) + on_disk < len(hashes) and self.pages.disk.has(hashes[len(hits) + on_disk]):
        on_disk += 1
    new = job.need - len(hits)
    if new > self.pages.available() - self.reserved:
      for block in hits:
        self.pages.release(block)
      return False
    self.reserved += new
    job.left = new
    for name in hashes[len(hits):len(hits) + on_disk]:
      arrays = self.pages.disk.get(name)
      if arrays is None:
        break
      block = self._allocate(job)
      self.pool = kv.write_block(self.pool, block, kv.block_from_host(self.pool, arrays))
      self.pages.register(block, name)
      hits.append(block)
    seq = _Seq(0, list(job.prompt), hits, hashes[:len(hits)], len(hits) * bs)
    job.seqs.append(seq)
    job.usage.prompt_tokens = P
    job.usage.prompt_cache_hit_tokens = len(hits) * bs
    job.usage.prompt_cache_miss_tokens = P - len(hits) * bs
    return True

  def _allocate(self, job: _Job) -> int:
    assert job.left > 0, "allocation beyond the request's reservation"
    job.left -= 1
    self.reserved -= 1
    return self.pages.allocate()

  # ------------------------------------------------------------------------- model calls

  def _on_mesh(self):
    return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

  def _run(self, rows: list[tuple[list[int], int, list[int]]], T: int):
    """rows of (new tokens, start position, block table) -> (last real token's logits [rows, V],
    the new tokens' routes [rows, T, L, K] with record_routes, else None)."""
    B = _pow2(len(rows), self.min_batch)
    # The view must hold every new slot: a write past its end would be clamped onto others.
    W = _pow2(max(max(len(t) for _, _, t in rows),
                  max(p + T for _, p, _ in rows) // self.block_size + 1))
    tokens, pos = np.zeros((B, T), np.int32), np.zeros((B,), np.int32)
    n, tables = np.zeros((B,), np.int32), np.full((B, W), NULL_BLOCK, np.int32)
    for i, (new, start, table) in enumerate(rows):
      tokens[i, :len(new)], pos[i], n[i] = new, start, len(new)
      tables[i, :len(table)] = table
    self.shapes.add((B, T, W))
    with self._on_mesh():
      logits, self.pool, *routes = kv.step(self.params, self.moe_state, self.pool, tokens, pos, n,
                                           tables, self.model_cfg, self.moe_cfg,
                                           self.record_routes)
    return _host(logits)[:len(rows)], _host(routes[0])[:len(rows)] if routes else None

  def _sample(self, job_seqs: list[tuple[_Job, _Seq]], logits) -> None:
    B = _pow2(len(job_seqs), self.min_batch)
    def pad(values, dtype, fill=0):
      values = list(values)
      return np.asarray(values + [fill] * (B - len(values)), dtype)
    reqs = [job.request for job, _ in job_seqs]
    logits = np.asarray(logits)
    logits = np.concatenate([logits, np.zeros((B - len(logits),) + logits.shape[1:],
                                              logits.dtype)])
    with self._on_mesh():
      tokens, logprobs, sample_logprobs = sample(
          logits, pad((r.temperature for r in reqs), np.float32),
          pad((r.top_p for r in reqs), np.float32, 1.0),
          pad((r.top_k for r in reqs), np.int32), pad((r.seed for r in reqs), np.int32),
          pad((s.choice for _, s in job_seqs), np.int32),
          pad((len(s.tokens) - len(job.prompt) for job, s in job_seqs), np.int32))
    for (job, seq), token, logprob, slogp in zip(job_seqs, _host(tokens), _host(logprobs),
                                                 _host(sample_logprobs)):
      self._append(job, seq, int(token), float(logprob), float(slogp))

  # ------------------------------------------------------------------------- prefill / decode

  def _prefill(self, job: _Job):
    seq, bs, P = job.seqs[0], self.block_size, len(job.prompt)
    while len(seq.blocks) < math.ceil(P / bs):
      seq.blocks.append(self._allocate(job))
    self.stats["prompt_tokens_cached"] += seq.computed
    while seq.computed < P:
      chunk = seq.tokens[seq.computed:seq.computed + self.prefill_chunk]
      logits, routes = self._run([(chunk, seq.computed, seq.blocks)],
                                 _pow2(len(chunk), MIN_PREFILL_BUCKET))
      if routes is not None:
        seq.routes.append(routes[0, :len(chunk)])
      seq.computed += len(chunk)
      self.stats["prompt_tokens_prefilled"] += len(chunk)
    self._register_full_blocks(seq)
    for choice in range(1, job.request.n):
      blocks = list(seq.blocks[:P // bs])
      for block in blocks:
        self.pages.share(block)
      if P % bs:
        copy = self._allocate(job)
        self.pool = kv.copy_block(self.pool, seq.blocks[-1], copy)
        blocks.append(copy)
      job.seqs.append(_Seq(choice, list(seq.tokens), blocks, list(seq.hashes), P,
                           routes=list(seq.routes)))
    self._sample([(job, s) for s in job.seqs], np.repeat(logits, len(job.seqs), axis=0))

  def _decode(self, live: list[_Seq]):
    owner = {id(s): job for job in self.running.values() for s in job.seqs}
    rows = []
    for seq in live:
      position = len(seq.tokens) - 1
      if position // self.block_size == len(seq.blocks):
        seq.blocks.append(self._allocate(owner[id(seq)]))
      rows.append(([seq.tokens[-1]], position, seq.blocks))
    logits, routes = self._run(rows, 1)
    self.stats["decode_steps"] += 1
    for i, seq in enumerate(live):
      if routes is not None:
        seq.routes.append(routes[i, :1])
      seq.computed += 1
      self._register_full_blocks(seq)
    self._sample([(owner[id(s)], s) for s in live], logits)

  def _register_full_blocks(self, seq: _Seq):
    if not self.prefix_cache:
      return
    bs = self.block_size
    while len(seq.hashes) < seq.computed // bs:
      i = len(seq.hashes)
      parent = seq.hashes[-1] if seq.hashes else self.root
      seq.hashes.append(block_hash(parent, seq.tokens[i * bs:(i + 1) * bs]))
      self.pages.register(seq.blocks[i], seq.hashes[-1])

  def _append(self, job: _Job, seq: _Seq, token: int, logprob: float, sample_logprob: float):
    r = job.request
    eos = getattr(self.tokenizer, "eos_id", None)
    if token in r.stop_token_ids or (token == eos and not r.ignore_eos):
      seq.finish, seq.stop = "stop", (token, sample_logprob)
      return
    seq.tokens.append(token)
    seq.logprobs.append(logprob)
    seq.sample_logprobs.append(sample_logprob)
    self.stats["tokens_generated"] += 1
    if job.on_token is not None:
      job.on_token(seq.choice, token, logprob)
    generated = seq.tokens[len(job.prompt):]
    if r.stop:
      text = self.tokenizer.decode(generated)
      cut = min((i for i in (text.find(s) for s in r.stop) if i >= 0), default=-1)
      if cut >= 0:
        seq.finish, seq.text = "stop", text[:cut]
        return
    if len(generated) >= r.max_tokens:
      seq.finish = "length"

  def _retire(self, job: _Job) -> Completion:
    choices = []
    for seq in job.seqs:
      generated = seq.tokens[len(job.prompt):]
      routes = self._routes(seq) if self.record_routes else None
      if seq.text is not None:
        keep = _tokens_before(self.tokenizer, generated, seq.text)
        generated, seq.logprobs = generated[:keep], seq.logprobs[:keep]
        seq.sample_logprobs = seq.sample_logprobs[:keep]
        routes = None if routes is None else routes[:len(job.prompt) + keep]
        text = seq.text
      else:
        text = self.tokenizer.decode(generated)
      stop_token, stop_logprob = seq.stop or (None, None)
      choices.append(Choice(seq.choice, text, generated, seq.logprobs, seq.finish, routes,
                            seq.sample_logprobs, stop_token, stop_logprob))
      job.usage.completion_tokens += len(seq.tokens) - len(job.prompt)
      for block in seq.blocks:
        self.pages.release(block)
    self.reserved -= job.left
    job.left = 0
    return Completion(job.prompt, choices, job.usage)

  def _routes(self, seq: _Seq) -> np.ndarray:
    """[len(tokens), L, K]: the computed positions' routes, -1 for the token not yet fed."""
    done = np.concatenate(seq.routes).astype(np.int32)
    missing = np.full((len(seq.tokens) - len(done),) + done.shape[1:], -1, np.int32)
    return np.concatenate([done, missing])


def _host(x) -> np.ndarray:
  """A step's output on this host; with several processes, gathered from all of them (every
  process runs the same loop on the same requests, so all take the same decisions)."""
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def _tokens_before(tokenizer, generated: list[int], text: str) -> int:
  """The most tokens of `generated` whose text is a prefix of `text` (what precedes a stop)."""
  keep = 0
  for k in range(1, len(generated) + 1):
    if not text.startswith(tokenizer.decode(generated[:k])):
      break
    keep = k
  return keep
