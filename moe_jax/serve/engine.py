"""The inference engine: continuous batching over a paged KV pool with a prefix cache.

  engine = Engine(params, moe_state, model_cfg, moe_cfg, num_blocks=512)
  completions = engine.generate([Request("def f(", max_tokens=32, n=4, temperature=0.6)])

Each `step()`:
  1. admits waiting requests, first come first served, while the batch has room for their n
     sequences and the pool can reserve every block they may need (admission.py). A request
     larger than the whole pool is refused at `submit`; one that does not fit now waits.
     Reserving up front means a running sequence never finds the pool full, so no sequence's
     blocks are ever taken from it.
  2. prefills the admitted prompts together, each once: the longest run of its full blocks
     already cached (each in memory, or in the disk tier, verified) is reused and only the rest
     is computed, in chunks, one row per prompt in the same calls; each prompt's n sequences
     then share its full blocks and get a copy of the partial last one.
  3. runs one decode step for every running sequence, batched (the batch padded to a power of
     two: a few compiled shapes serve every mix of requests). With speculative_tokens = k > 0,
     the MTP module drafts up to k tokens and one forward verifies them (spec_decode.py).
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

Failures: a bad request is refused at `submit` (BadRequest, the client's to fix); one that fails
later on its own (its on_token callback, its tokenizer's text) ends with `Completion.error`
(RequestFailed) and its blocks freed, while the others go on. A failed model call leaves the
engine unable to go on: `alive` turns False, `error` names the cause, and every later call
raises EngineStopped. A cache block is reused only when its hash (rooted in the model's
fingerprint and the cache format, keys.py) matches, and a disk-tier block only when its file
passes its checks (pages.DiskTier); a file that fails is reported, set aside and recomputed.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import os
from typing import Callable, Optional, Sequence

import jax
import numpy as np
from jax._src import config as jax_config  # the thread-local setting has no public handle

from moe_jax import sharding
from moe_jax.config import ModelConfig, MoEConfig
from moe_jax.serve import keys, kv, spec_decode
from moe_jax.serve.admission import Admission, Job, Seq, request_seed, shared_entropy
from moe_jax.serve.keys import ByteTokenizer, fingerprint  # pylint: disable=unused-import  (API)
from moe_jax.serve.pages import NULL_BLOCK, Pages, block_hash
from moe_jax.serve.requests import Choice, Completion, EngineStopped, Request, RequestFailed
from moe_jax.serve.sampling import sample, top_logprobs

MIN_PREFILL_BUCKET = 16


def _pow2(n: int, floor: int = 1) -> int:
  return max(floor, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


class Engine(Admission):
  """See the module docstring. `stats` counts prefilled and cached prompt tokens, prefill calls,
  decode steps, drafted_<j> / accepted_<j> (speculative: drafts at position j and those kept)
  and the shapes compiled; `alive` / `error` say whether the engine can go on."""

  def __init__(self, params, moe_state, model_cfg: ModelConfig, moe_cfg: MoEConfig, *,
               num_blocks: int = 256, block_size: int = 16, max_batch: int = 16,
               prefill_chunk: int = 512, prefix_cache: bool = True,
               disk_dir: Optional[str] = None, fp8_cache: bool = False, mesh=None,
               tokenizer=None, record_routes: bool = False, prefill_tokens: int = 4096,
               speculative_tokens: int = 0):
    for name, value, low in (("num_blocks", num_blocks, 2), ("block_size", block_size, 1),
                             ("max_batch", max_batch, 1), ("prefill_chunk", prefill_chunk, 1),
                             ("prefill_tokens", prefill_tokens, 1),
                             ("speculative_tokens", speculative_tokens, 0)):
      if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"serve.{name}={value!r}: must be an integer >= {low}")
    if speculative_tokens and not model_cfg.mtp_depth:
      raise ValueError(f"serve.speculative_tokens={speculative_tokens}: the model has no MTP "
                       f"module to draft with (model.mtp_depth=0); use 0")
    self.speculative_tokens = speculative_tokens  # drafts per step (spec_decode.py); 0: off
    self.params, self.moe_state, self.model_cfg = params, moe_state, model_cfg
    self.moe_cfg = dataclasses.replace(moe_cfg, capacity_factor=None)
    self.block_size, self.max_batch, self.prefill_chunk = block_size, max_batch, prefill_chunk
    self.prefill_tokens = prefill_tokens  # padded tokens per prefill call (one row always fits)
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
    model_id = fingerprint(params, moe_state, model_cfg)
    fmt = keys.cache_format(self.pool, block_size, self.tokenizer)
    self.root = keys.root(model_id, fmt)
    disk = disk_dir and self.prefix_cache and self._disk_tier(os.path.join(disk_dir, model_id),
                                                              keys.format_name(fmt))
    self.pages = Pages(num_blocks, disk=disk or None,
                       read_block=lambda b: kv.read_block(self.pool, b))
    self.reserved = 0
    self.waiting: collections.deque[int] = collections.deque()
    self.running: dict[int, Job] = {}
    self.jobs: dict[int, Job] = {}
    self._next_id = 0
    self._entropy = shared_entropy()
    self.error: Optional[str] = None
    self.stats = collections.Counter()
    self.shapes: set[tuple] = set()

  # ------------------------------------------------------------------------- the public calls

  @property
  def alive(self) -> bool:
    return self.error is None

  def generate(self, requests: Sequence[Request]) -> list[Completion]:
    """Completions of `requests`, in order (all are checked before any work starts); a request
    that failed raises its error."""
    self._checked(requests)
    ids = [self.submit(r) for r in requests]
    done: dict[int, Completion] = {}
    while len(done) < len(ids):
      done.update(self.step())
    for i in ids:
      if done[i].error is not None:
        raise done[i].error
    return [done[i] for i in ids]

  def submit(self, request: Request, on_token: Optional[Callable] = None) -> int:
    """Queues a request (BadRequest if it cannot be served); returns its id. on_token(choice,
    token_id, logprob) is called for each sampled token, before stop strings are looked for: a
    streaming caller holds back text that a stop string may still cut. Usage counts every
    generated token, the cut ones included (they were computed)."""
    if self.error is not None:
      raise EngineStopped(f"the engine stopped: {self.error}")
    job = self._checked([request])[0]
    job.on_token = on_token
    job_id, self._next_id = self._next_id, self._next_id + 1
    job.seed = request.seed if request.seed is not None else request_seed(self._entropy, job_id)
    self.jobs[job_id] = job
    self.waiting.append(job_id)
    return job_id

  def has_work(self) -> bool:
    return bool(self.waiting or self.running)

  def step(self) -> dict[int, Completion]:
    """One round of admission, prefill and decode; returns the requests that finished."""
    if self.error is not None:
      raise EngineStopped(f"the engine stopped: {self.error}")
    # JAX's persistent compilation cache crashed (SIGSEGV) writing the engine's step executable
    # in CI, twice, on the main thread and on the server's (BUILD_NOTES.md, "Serving engine"):
    # what the engine compiles is not written there (a thread-local setting; reads still hit).
    with jax_config.persistent_cache_min_compile_time_secs(float("inf")):
      try:
        return self._step()
      except Exception as e:
        self.error = f"{type(e).__name__}: {e}"
        raise

  def _step(self) -> dict[int, Completion]:
    while self.waiting:
      group = self._admit_group()
      if not group:
        break
      self._prefill(group)
    live = [(job, s) for job in self.running.values() for s in job.seqs if s.finish is None]
    if live:
      self._decode(live)
    finished = {}
    for job_id, job in list(self.running.items()):
      if all(s.finish is not None for s in job.seqs):
        finished[job_id] = self._retire(job)
        del self.running[job_id], self.jobs[job_id]
    return finished

  def close(self):
    """Writes the cached prefix blocks to the disk tier, so a new process finds them."""
    self.pages.flush_to_disk()

  # ------------------------------------------------------------------------- admission

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
    return kv.host(logits)[:len(rows)], kv.host(routes[0])[:len(rows)] if routes else None

  def _sample(self, job_seqs: list[tuple[Job, Seq]], logits) -> None:
    B = _pow2(len(job_seqs), self.min_batch)
    def pad(values, dtype, fill=0):
      values = list(values)
      return np.asarray(values + [fill] * (B - len(values)), dtype)
    reqs = [job.request for job, _ in job_seqs]
    logits = np.asarray(logits)
    logits = np.concatenate([logits, np.zeros((B - len(logits),) + logits.shape[1:],
                                              logits.dtype)])
    k = max(r.top_logprobs for r in reqs)
    with self._on_mesh():
      tokens, logprobs, sample_logprobs = sample(
          logits, pad((r.temperature for r in reqs), np.float32),
          pad((r.top_p for r in reqs), np.float32, 1.0),
          pad((r.top_k for r in reqs), np.int32), pad((job.seed for job, _ in job_seqs), np.int32),
          pad((s.choice for _, s in job_seqs), np.int32),
          pad((len(s.tokens) - len(job.prompt) for job, s in job_seqs), np.int32))
      top = [kv.host(x) for x in top_logprobs(logits, k)] if k else None
    for i, ((job, seq), token, logprob, slogp) in enumerate(zip(
        job_seqs, kv.host(tokens), kv.host(logprobs), kv.host(sample_logprobs))):
      alternatives = None
      if top is not None and job.request.top_logprobs:
        alternatives = {int(t): float(p) for t, p in zip(top[0][i, :job.request.top_logprobs],
                                                         top[1][i, :job.request.top_logprobs])}
      try:
        self._append(job, seq, (int(token), float(logprob), float(slogp)), alternatives)
      except Exception as e:  # pylint: disable=broad-except  (its callback or text: its failure)
        self._fail(job, e)

  def _fail(self, job: Job, error: Exception):
    """Ends a request that failed on its own (the others go on): its sequences stop now."""
    if job.error is None:
      job.error = RequestFailed(f"the request failed: {type(error).__name__}: {error}")
    for seq in job.seqs:
      seq.finish = seq.finish or "error"

  # ------------------------------------------------------------------------- prefill / decode

  def _prefill(self, group: list[Job]):
    """Every job's uncached prompt tokens, one row per prompt in shared calls (a row up to
    prefill_chunk tokens, a call up to prefill_tokens padded tokens, its rows of one length
    bucket); then the first tokens of all of them, sampled together."""
    bs = self.block_size
    for job in group:
      seq = job.seqs[0]
      while len(seq.blocks) < math.ceil(len(job.prompt) / bs):
        seq.blocks.append(self._allocate(job))
      self.stats["prompt_tokens_cached"] += seq.computed
    last = {}
    pending = list(group)
    while pending:
      # One call per length bucket: rows are padded only as far as each would be alone.
      size = lambda job: min(len(job.prompt) - job.seqs[0].computed, self.prefill_chunk)
      T = _pow2(size(pending[0]), MIN_PREFILL_BUCKET)
      rows = []
      for job in pending:
        if _pow2(size(job), MIN_PREFILL_BUCKET) != T:
          continue
        if rows and _pow2(len(rows) + 1, self.min_batch) * T > self.prefill_tokens:
          break
        rows.append((job, job.seqs[0].tokens[job.seqs[0].computed:][:size(job)]))
      del rows[max(self.min_batch, 1 << (len(rows).bit_length() - 1)):]  # no padding rows
      logits, routes = self._run([(chunk, job.seqs[0].computed, job.seqs[0].blocks)
                                  for job, chunk in rows], T)
      for i, (job, chunk) in enumerate(rows):
        seq = job.seqs[0]
        if routes is not None:
          seq.routes.append(routes[i, :len(chunk)])
        seq.computed += len(chunk)
        self.stats["prompt_tokens_prefilled"] += len(chunk)
        last[id(job)] = logits[i]
      self.stats["prefill_calls"] += 1
      pending = [job for job in pending if job.seqs[0].computed < len(job.prompt)]
    job_seqs, rows = [], []
    for job in group:
      self._share_prompt(job)
      job_seqs += [(job, s) for s in job.seqs]
      rows += [last[id(job)]] * len(job.seqs)
    self._sample(job_seqs, np.stack(rows))

  def _share_prompt(self, job: Job):
    """The prompt's n sequences: its full blocks shared, a copy each of the partial last one."""
    seq, bs, P = job.seqs[0], self.block_size, len(job.prompt)
    self._register_full_blocks(seq)
    for choice in range(1, job.request.n):
      blocks = list(seq.blocks[:P // bs])
      for block in blocks:
        self.pages.share(block)
      if P % bs:
        copy = self._allocate(job)
        self.pool = kv.copy_block(self.pool, seq.blocks[-1], copy)
        blocks.append(copy)
      job.seqs.append(Seq(choice, list(seq.tokens), blocks, list(seq.hashes), P,
                           routes=list(seq.routes)))

  def _decode(self, live: list[tuple[Job, Seq]]):
    if self.speculative_tokens:
      spec_decode.decode(self, live)
      return
    rows = []
    for job, seq in live:
      position = len(seq.tokens) - 1
      if position // self.block_size == len(seq.blocks):
        seq.blocks.append(self._allocate(job))
      rows.append(([seq.tokens[-1]], position, seq.blocks))
    logits, routes = self._run(rows, 1)
    self.stats["decode_steps"] += 1
    for i, (_, seq) in enumerate(live):
      if routes is not None:
        seq.routes.append(routes[i, :1])
      seq.computed += 1
      self._register_full_blocks(seq)
    self._sample(live, logits)

  def _register_full_blocks(self, seq: Seq):
    if not self.prefix_cache:
      return
    bs = self.block_size
    while len(seq.hashes) < seq.computed // bs:
      i = len(seq.hashes)
      parent = seq.hashes[-1] if seq.hashes else self.root
      seq.hashes.append(block_hash(parent, seq.tokens[i * bs:(i + 1) * bs]))
      self.pages.register(seq.blocks[i], seq.hashes[-1])

  def _append(self, job: Job, seq: Seq, sampled: tuple[int, float, float], top: Optional[dict]):
    """sampled: (token, its log-prob under the model, under the sampling distribution)."""
    token, logprob, sample_logprob = sampled
    r = job.request
    eos = getattr(self.tokenizer, "eos_id", None)
    if token in r.stop_token_ids or (token == eos and not r.ignore_eos):
      seq.finish, seq.stop = "stop", (token, sample_logprob)
      return
    seq.tokens.append(token)
    seq.logprobs.append(logprob)
    seq.sample_logprobs.append(sample_logprob)
    self.stats["tokens_generated"] += 1
    if top is not None:
      seq.top.append(top)
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

  def _retire(self, job: Job) -> Completion:
    """The job's completion (or its error); its blocks released either way."""
    try:
      choices = [] if job.error is not None else [self._choice(job, s) for s in job.seqs]
    except Exception as e:  # pylint: disable=broad-except  (decoding its text: its failure)
      self._fail(job, e)
      choices = []
    for seq in job.seqs:
      job.usage.completion_tokens += len(seq.tokens) - len(job.prompt)
    self._release(job)
    return Completion(job.prompt, choices, job.usage, job.error)

  def _choice(self, job: Job, seq: Seq) -> Choice:
    generated = seq.tokens[len(job.prompt):]
    routes = self._routes(seq) if self.record_routes else None
    logprobs, top = seq.logprobs, seq.top if job.request.top_logprobs else None
    sample_logprobs = seq.sample_logprobs
    if seq.text is not None:
      keep = _tokens_before(self.tokenizer, generated, seq.text)
      generated, logprobs = generated[:keep], logprobs[:keep]
      sample_logprobs = sample_logprobs[:keep]
      top = None if top is None else top[:keep]
      routes = None if routes is None else routes[:len(job.prompt) + keep]
      text = seq.text
    else:
      text = self.tokenizer.decode(generated)
    stop_token, stop_logprob = seq.stop or (None, None)
    return Choice(seq.choice, text, generated, logprobs, seq.finish, routes,
                  sample_logprobs=sample_logprobs, stop_token=stop_token,
                  stop_logprob=stop_logprob, top_logprobs=top)

  def _routes(self, seq: Seq) -> np.ndarray:
    """[len(tokens), L, K]: the computed positions' routes, -1 for the token not yet fed."""
    done = np.concatenate(seq.routes).astype(np.int32)
    missing = np.full((len(seq.tokens) - len(done),) + done.shape[1:], -1, np.int32)
    return np.concatenate([done, missing])


def _tokens_before(tokenizer, generated: list[int], text: str) -> int:
  """The most tokens of `generated` whose text is a prefix of `text` (what precedes a stop)."""
  keep = 0
  for k in range(1, len(generated) + 1):
    if not text.startswith(tokenizer.decode(generated[:k])):
      break
    keep = k
  return keep
