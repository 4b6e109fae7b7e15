"""Training: the train state, the jitted step, and the loop around it.

The train state is a plain dict pytree, checkpointed whole:
  step       int32, optimizer steps completed (batch i is a pure function of (seed, i))
  params     float32 parameters (model.init), sharded by model.param_axes
  moe_state  router biases, updated from the step's global expert loads (never by gradients)
  opt_state  global-norm clipping + Adam moments (train.optimizer_state_dtype, both moments)
             + decoupled weight decay (AdamW)
  rng        uint32 key data of a threefry key, for stochastic parts (none yet): derive per-step
             keys as fold_in(rng, step) so that a resumed run draws the same ones
  bad_steps  int32, non-finite steps in a row (the numerics guard)
  fp8        FP8 delayed-scaling state (amax histories), present only for fp8.recipe="delayed"
             (model.init_fp8_state): each step replaces it by the loss's gradient w.r.t. it
             (fp8.py), outside the optimizer, clipping and weight decay

The learning rate is a function of `step` (linear warmup, cosine decay to min_lr_ratio), not of
the optimizer's own count, which a skipped (non-finite) step does not advance.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import signal
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from moe_jax import checkpoint, ctrl_c, data, metrics, model, sharding, workdir as workdirs
from moe_jax.config import ConfigError, ExperimentConfig, TrainConfig

BATCH_AXES = ("batch", "seq")
CONFIG_FILE = workdirs.CONFIG_FILE


class NonFinite(RuntimeError):
  """Numbers that cannot be trusted (a diverged run, NaN weights); the message is one line."""


class Diverged(NonFinite):
  """Too many non-finite steps in a row; the message is one line."""


class Preempted(Exception):
  """SIGTERM or SIGINT arrived: the current step is saved. Raised (not returned) so that a study
  training several runs stops too instead of starting its next run inside the grace period."""

  def __init__(self, message: str, signum: int = signal.SIGTERM):
    super().__init__(message)
    self.signum = signum


def learning_rate(step: jax.Array, cfg: TrainConfig) -> jax.Array:
  """Linear warmup to the peak over warmup_steps (step 0 already moves), then cosine decay to
  peak * min_lr_ratio at the last step."""
  step = jnp.asarray(step, jnp.float32)
  warm = (step + 1) / max(cfg.warmup_steps, 1)
  progress = jnp.clip((step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps - 1, 1), 0, 1)
  cosine = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
  return cfg.learning_rate * jnp.where(step < cfg.warmup_steps, warm, cosine)


def _scale_by_adam(cfg: TrainConfig) -> optax.GradientTransformation:
  """Adam with both moments stored in cfg.optimizer_state_dtype (V3 keeps them in bfloat16).
  optax's mu_dtype covers the first moment only; the second is cast here around each update,
  which computes in float32."""
  dtype = jnp.dtype(cfg.optimizer_state_dtype)
  adam = optax.scale_by_adam(cfg.b1, cfg.b2, mu_dtype=dtype)
  if dtype == jnp.float32:
    return adam
  cast = lambda tree, dt: jax.tree.map(lambda a: a.astype(dt), tree)

  def init(params):
    state = adam.init(params)
    return state._replace(nu=cast(state.nu, dtype))

  def update(updates, state, params=None):
    updates, state = adam.update(updates, state._replace(nu=cast(state.nu, jnp.float32)), params)
    return updates, state._replace(nu=cast(state.nu, dtype))
  return optax.GradientTransformation(init, update)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  """AdamW without its learning rate (see `learning_rate`); matrices decay, norm scales do not."""
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  return optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity(),
      _scale_by_adam(cfg), optax.add_decayed_weights(cfg.weight_decay, decay_mask))


def init_state(key: jax.Array, cfg: ExperimentConfig) -> dict:
  params, moe_state = model.init(key, cfg.model, cfg.moe)
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "moe_state": moe_state,
           "opt_state": make_optimizer(cfg.train).init(params),
           "rng": jax.random.key_data(jax.random.fold_in(key, 1)),
           "bad_steps": jnp.zeros((), jnp.int32)}
  if hasattr(model, "init_fp8_state"):
    fp8 = model.init_fp8_state(cfg.model, cfg.moe, cfg.fp8)
    if fp8:
      state["fp8"] = fp8
  return state


def state_shardings(cfg: ExperimentConfig, mesh) -> Any:
  """NamedShardings of the train state: parameters (and their Adam moments) by their logical
  axes, everything else replicated."""
  replicated = sharding.named_sharding(mesh, ())
  abstract = jax.eval_shape(functools.partial(init_state, cfg=cfg), jax.random.key(0))
  params = sharding.shard_like(model.param_axes(cfg.model, cfg.moe), mesh)
  opt = optax.tree_map_params(make_optimizer(cfg.train), lambda _, s: s, abstract["opt_state"],
                              params, transform_non_params=lambda _: replicated)
  out = jax.tree.map(lambda _: replicated, abstract)
  out.update(params=params, opt_state=opt,
             moe_state=sharding.shard_like(model.moe_state_axes(cfg.model, cfg.moe), mesh))
  return out


def check_divisible(cfg: ExperimentConfig, mesh):
  """Every sharded parameter dim must split evenly over its mesh axes (JAX refuses uneven)."""
  abstract = jax.eval_shape(functools.partial(init_state, cfg=cfg), jax.random.key(0))["params"]
  names = model.param_axes(cfg.model, cfg.moe)
  for (path, leaf), axes in zip(jax.tree_util.tree_flatten_with_path(abstract)[0],
                                jax.tree.leaves(names, is_leaf=lambda x: isinstance(x, tuple))):
    for dim, (size, mesh_axes) in enumerate(zip(leaf.shape, sharding.logical_to_spec(axes))):
      mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else (mesh_axes or ())
      n = math.prod(mesh.shape[a] for a in mesh_axes)
      if size % n:
        raise ConfigError(f"params{jax.tree_util.keystr(path)}.shape[{dim}]={size}: must be "
                          f"divisible by mesh {'*'.join(mesh_axes)}={n} (logical {axes[dim]!r})")


def mtp_weight(step, cfg: ExperimentConfig) -> jax.Array:
  """The MTP loss weight at `step`: model.mtp_loss_weight, then mtp_loss_weight_late from
  mtp_late_from * train.steps on (V3's schedule)."""
  m = cfg.model
  late = step >= int(round(m.mtp_late_from * cfg.train.steps)) if m.mtp_late_from < 1 else False
  return jnp.where(late, m.mtp_loss_weight_late, m.mtp_loss_weight).astype(jnp.float32)


def pipe(cfg: TrainConfig) -> tuple[int, int]:
  """The pipeline's (micro-batches, repeats) (pipeline.py; mesh.stage gives the stages)."""
  return cfg.microbatches, cfg.pipeline_repeats


def train_step(state: dict, batch: dict, cfg: ExperimentConfig) -> tuple[dict, dict]:
  """One AdamW step on the global batch; not applied when the loss or gradient is not finite."""
  step = state["step"]
  loss_fn = lambda p, f: model.loss(p, state["moe_state"], batch, cfg.model, cfg.moe, cfg.fp8, f,
                                    mtp_weight=mtp_weight(step, cfg), pipe=pipe(cfg.train))
  # The FP8 state's gradient is its update (delayed scaling); it never meets the optimizer.
  (loss, aux), (grads, fp8_state) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
      state["params"], state.get("fp8"))
  if cfg.train.inject_nan_at_steps:  # fault injection (tests of this guard)
    poison = jnp.isin(step, jnp.asarray(cfg.train.inject_nan_at_steps, jnp.int32))
    grads = jax.tree.map(lambda g: jnp.where(poison, jnp.nan, g), grads)
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = make_optimizer(cfg.train).update(grads, state["opt_state"],
                                                        state["params"])
  lr = learning_rate(step, cfg.train)
  updates = jax.tree.map(lambda u: -lr * u, updates)
  params = optax.apply_updates(state["params"], updates)
  moe_state = model.update_moe_state(state["moe_state"], aux["load"], cfg.moe)
  # The update too: finite gradients can still give a NaN step (a corrupted optimizer moment),
  # and what is applied here is what the next checkpoint saves.
  finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm) &
            jnp.isfinite(optax.tree.norm(updates)) & jnp.isfinite(optax.tree.norm(moe_state)))
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  bad_steps = jnp.where(finite, 0, state["bad_steps"] + 1)
  new_state = dict(state, step=step + 1, bad_steps=bad_steps,
                   params=keep(params, state["params"]),
                   opt_state=keep(opt_state, state["opt_state"]),
                   moe_state=keep(moe_state, state["moe_state"]))
  if "fp8" in state:  # a non-finite step's amaxes would poison the histories
    new_state["fp8"] = keep(fp8_state, state["fp8"])
  load = aux["load"] / jnp.maximum(aux["load"].sum(-1, keepdims=True), 1.0)
  out = {k: aux[k] for k in ("ce", "mtp_ce", "balance_loss", "max_vio", "dropped_fraction")}
  out.update(loss=loss, load=load, grad_norm=grad_norm, learning_rate=lr, bad_steps=bad_steps,
             applied=finite.astype(jnp.float32))
  return new_state, out


def eval_step(params: dict, moe_state: dict, batch: dict, fp8_state: Any = None, *,
              cfg: ExperimentConfig) -> dict:
  """Held-out loss; the FP8 state (delayed) is only read: a forward pass does not update it."""
  loss, aux = model.loss(params, moe_state, batch, cfg.model, cfg.moe, cfg.fp8, fp8_state,
                         pipe=pipe(cfg.train))
  return {"eval_loss": loss, "eval_ce": aux["ce"]}


class Batches:
  """This process's rows of each global batch, placed as one global array on the mesh."""

  def __init__(self, dataset: data.Dataset, cfg: TrainConfig, mesh):
    self._dataset, self._cfg, self._mesh = dataset, cfg, mesh
    shape = (cfg.batch_size, cfg.seq_len)
    rows = sharding.process_rows(mesh, BATCH_AXES, shape)
    local = rows.stop - rows.start
    # Processes that hold the same rows (a tensor axis across hosts) read the same data.
    self._part = dict(process_index=rows.start // local, process_count=cfg.batch_size // local)

  def _place(self, local: dict) -> dict:
    return {k: sharding.global_array(v, self._mesh, BATCH_AXES) for k, v in local.items()}

  def train(self, step: int) -> dict:
    return self._place(data.get_batch(self._dataset, "train", step, seed=self._cfg.seed,
                                      batch_size=self._cfg.batch_size,
                                      seq_len=self._cfg.seq_len, **self._part))

  def eval(self, index: int) -> dict:
    return self._place(data.get_eval_batch(self._dataset, index, batch_size=self._cfg.batch_size,
                                           seq_len=self._cfg.seq_len, **self._part))


class Setup:
  """Everything checked and compiled before a run writes anything: mesh, data, jitted functions."""

  def __init__(self, cfg: ExperimentConfig):
    jax.config.update("jax_threefry_partitionable", True)
    cfg.check_devices(jax.device_count(), jax.process_count())
    self.cfg, self.mesh = cfg, sharding.make_mesh(cfg.mesh)
    check_divisible(cfg, self.mesh)
    self.dataset = data.load_dataset(cfg.data)
    data.check_vocab(self.dataset, cfg.data, cfg.model.vocab_size)
    for split in data.SPLITS:
      if data.num_windows(len(self.dataset.split(split)), cfg.train.seq_len) == 0:
        raise ConfigError(f"train.seq_len={cfg.train.seq_len}: longer than the {split} split of "
                          f"data.source={cfg.data.source!r} ({len(self.dataset.split(split))} "
                          "tokens)")
    self.batches = Batches(self.dataset, cfg.train, self.mesh)
    self.shardings = state_shardings(cfg, self.mesh)
    replicated = sharding.named_sharding(self.mesh, ())
    batch = {k: sharding.named_sharding(self.mesh, BATCH_AXES) for k in ("inputs", "targets")}
    self.init = self._on_mesh(jax.jit(functools.partial(init_state, cfg=cfg),
                                       out_shardings=self.shardings))
    self.step = self._on_mesh(jax.jit(functools.partial(train_step, cfg=cfg), donate_argnums=0,
                                      in_shardings=(self.shardings, batch),
                                      out_shardings=(self.shardings, replicated)))
    self.eval = self._on_mesh(jax.jit(
        functools.partial(eval_step, cfg=cfg), out_shardings=replicated,
        in_shardings=(self.shardings["params"], self.shardings["moe_state"], batch,
                      self.shardings.get("fp8"))))

  def _on_mesh(self, fn: Callable) -> Callable:
    """fn traced with the mesh set: activation constraints and the expert-parallel MoE layer
    (shard_map) read it from `jax.sharding.get_abstract_mesh()`."""
    def call(*args):
      with jax.set_mesh(self.mesh):
        return fn(*args)
    return call

  def abstract_state(self) -> Any:
    shapes = jax.eval_shape(functools.partial(init_state, cfg=self.cfg), jax.random.key(0))
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes,
                        self.shardings)

  def evaluate(self, state: dict) -> dict:
    totals = None
    for i in range(self.cfg.train.eval_batches):
      out = self.eval(state["params"], state["moe_state"], self.batches.eval(i),
                      state.get("fp8"))
      totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    means = {k: float(v) / self.cfg.train.eval_batches for k, v in totals.items()}
    means["eval_perplexity"] = metrics.perplexity(means["eval_loss"])
    return means


class _Preemption:
  """SIGTERM or SIGINT (Ctrl-C) sets a flag; the loop saves and exits at the next step boundary.
  A second SIGINT ends the process at once. With several processes they agree (an all-gather)
  so that all stop at the same step."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    ctrl_c.raise_if_pressed()  # a Ctrl-C during start-up that a library swallowed
    self.signum = 0
    self._old = {s: signal.signal(s, self._handler) for s in self.SIGNALS}

  def _handler(self, signum, frame):
    del frame
    self.signum = signum
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # the next Ctrl-C does not wait for the save

  def requested(self) -> int:
    """The signal received (0 if none); the highest of all processes'."""
    if jax.process_count() == 1:
      return self.signum
    return int(np.max(multihost_utils.process_allgather(np.int32(self.signum))))

  def close(self):
    for s, handler in self._old.items():
      signal.signal(s, handler)


def _mean(window: list[dict]) -> dict:
  """Means over the window's applied steps (all steps if none was applied)."""
  window = jax.device_get(window)
  applied = [m for m in window if m["applied"]] or window
  out = {k: np.mean([m[k] for m in applied], axis=0) for k in applied[0]
         if k not in ("applied", "bad_steps", "learning_rate")}
  out = {k: (float(v) if v.ndim == 0 else v.tolist()) for k, v in out.items()}
  out = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in out.items()}
  out.update(learning_rate=float(window[-1]["learning_rate"]),
             skipped_steps=int(sum(1 - m["applied"] for m in window)),
             bad_steps=int(window[-1]["bad_steps"]))
  return out


def stop_diverged(ckpt: checkpoint.Checkpointer, done: int, bad: int, max_bad: int, *,
                  every: str, step_name: str = "step", counted: str = "steps"):
  """The finite-update guard's stop (training's and RL's): Diverged naming the cause and the
  newest verified checkpoint, once the saves in flight are finished."""
  ckpt.wait()
  good, newest = ckpt.last_good(), max(ckpt.steps(), default=0)
  if good:
    last = f"the last good checkpoint is {step_name} {good} in {ckpt.directory}"
  elif newest:
    last = f"no checkpoint is verified (the newest, {step_name} {newest}, has no checksums)"
  else:
    last = f"no checkpoint was saved before it ({every})"
  raise Diverged(f"stopped at {step_name} {done}: loss, gradient or update not finite for "
                 f"{bad} {counted} in a row (train.max_bad_steps={max_bad}); {last}")


def _resume(cfg: ExperimentConfig, setup: Setup, path: str, ckpt: checkpoint.Checkpointer,
            say) -> tuple[Any, int]:
  """The state to continue from and its step; checks everything before the run writes."""
  changes = workdirs.check_config(cfg, path, report=say)
  state, start = ckpt.restore_latest(setup.abstract_state(), report=say)
  if start > cfg.train.steps:
    raise ConfigError(f"train.steps={cfg.train.steps}: the run in {path} is already at step "
                      f"{start}; give train.steps >= {start} to continue it, or another --workdir")
  if state is not None and changes:
    say("resuming with " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()) +
        f" (recorded in {workdirs.HISTORY_FILE})")
    if jax.process_index() == 0:
      workdirs.record_changes(path, start, changes)
  return state, start


def train(cfg: ExperimentConfig, workdir: str,
          step_hooks: Sequence[Callable[[int, dict], None]] = ()) -> dict:
  """Trains (or resumes) the run in `workdir`; returns the last logged train record.

  step_hooks: called as hook(steps_completed, state) after every step (tests use it to kill).
  Raises ConfigError before writing anything if the config does not fit this machine, the data,
  the workdir or its checkpoints, or another run holds the workdir; Diverged; checkpoint.
  SaveFailed; and Preempted after saving the current step on SIGTERM or SIGINT.
  """
  setup = Setup(cfg)
  with workdirs.claim(workdir):
    return _train(cfg, setup, workdir, step_hooks)


def _train(cfg: ExperimentConfig, setup: Setup, path: str,
           step_hooks: Sequence[Callable[[int, dict], None]]) -> dict:
  main, t = jax.process_index() == 0, cfg.train
  say = print if main else (lambda *_: None)
  ckpt = checkpoint.Checkpointer(os.path.join(path, "checkpoints"), keep=t.keep_checkpoints)
  try:
    state, start = _resume(cfg, setup, path, ckpt, say)
  except BaseException:
    ckpt.close()
    raise
  say(f"{jax.process_count()} process(es), {jax.device_count()} devices "
      f"({jax.devices()[0].platform}), mesh {dict(setup.mesh.shape)}, data {setup.dataset.name}")
  if state is None:
    state = setup.init(jax.random.key(t.seed))
  else:
    say(f"resumed from step {start} ({ckpt.directory}/{start})")
  if main:
    workdirs.write_config(path, cfg)
  ckpt.prune()
  log = metrics.MetricsLog(path, enabled=main, resume_step=start, report=say)
  if start == t.steps:
    say(f"the run in {path} is complete at step {start} (train.steps={t.steps}); nothing to do")
    log.close()
    ckpt.close()
    records = [r for r in metrics.read_jsonl(log.path) if "loss" in r]
    return records[-1] if records else {}
  progress = metrics.Progress(t.steps)
  tokens_per_step = t.batch_size * t.seq_len
  flops_per_token = metrics.train_flops_per_token(model.count_params(cfg.model, cfg.moe),
                                                  cfg.model, t.seq_len)
  # MFU against the chip's published peak; none on CPU, where only achieved GFLOP/s is logged
  # (a matmul timed at start-up on a shared machine once gave "MFU 107%").
  peak = metrics.peak_flops(jax.devices()[0], cfg.model.dtype)
  preemption, window, record, preempted = _Preemption(), [], {}, None
  clock, clock_step = None, start
  try:
    batch = setup.batches.train(start)
    for s in range(start, t.steps):
      state, out = setup.step(state, batch)
      window.append(out)
      for hook in step_hooks:
        hook(s + 1, state)
      if s + 1 < t.steps:
        batch = setup.batches.train(s + 1)  # host work overlapping the device step
      bad = int(out["bad_steps"])
      done = s + 1
      if clock is None:  # the first step includes compilation: time from its end
        clock, clock_step = time.perf_counter(), done
      elapsed, steps_timed = time.perf_counter() - clock, done - clock_step
      diverged = bad >= t.max_bad_steps
      if bad == 0 and (done % t.checkpoint_every == 0 or done == t.steps):
        ckpt.save(done, state)
      ckpt.poll()  # checksums of a finished save
      if done % t.log_every == 0 or done == t.steps or diverged:
        record = dict(step=done, **_mean(window))
        window = []
        rate = steps_timed / elapsed if steps_timed and elapsed > 0 else float("nan")
        clock, clock_step = time.perf_counter(), done  # tokens/s of this interval only
        achieved = rate * tokens_per_step * flops_per_token / jax.device_count()
        record.update(perplexity=metrics.perplexity(record["loss"] or float("nan")),
                      tokens_per_s=rate * tokens_per_step, gflops_per_s=achieved / 1e9,
                      mfu=achieved / peak if peak else None)
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                  for k, v in record.items()}
        log.write(record)
        if main:
          eta = (t.steps - done) / rate if rate == rate and rate > 0 else None
          progress.update(done, record["loss"] or float("nan"), record["tokens_per_s"] or 0.0,
                          eta, f"MFU {record['mfu']:.1%}" if record["mfu"] is not None
                          else f"{record['gflops_per_s'] or 0:.1f} GFLOP/s per device")
      if diverged:
        stop_diverged(ckpt, done, bad, t.max_bad_steps,
                      every=f"train.checkpoint_every={t.checkpoint_every}")
      if done % t.eval_every == 0 or done == t.steps:
        result = setup.evaluate(state)
        log.write(dict(step=done, **result))
        if main:
          progress.message(f"step {done}: held-out loss {result['eval_loss']:.4f}")
        clock, clock_step = time.perf_counter(), done  # evaluation is not training throughput
      signum = preemption.requested()
      if signum:
        ckpt.save(done, state, wait=True)
        name = signal.Signals(signum).name
        if main:
          progress.message(f"{name}: saved step {done} to {ckpt.directory}, exiting")
        preempted = Preempted(f"{name}: stopped after saving step {done} in {path}", signum)
        break
    ckpt.wait()
  finally:
    preemption.close()
    if main:
      progress.close()
    log.close()
    with contextlib.suppress(checkpoint.SaveFailed):  # raised above already, if it failed
      ckpt.close()
  if main:
    metrics.plot(path)
  if preempted is not None:
    raise preempted
  return record


def load_state(cfg: ExperimentConfig, workdir: str) -> tuple[Setup, dict, int]:
  """(setup, state, step) of the latest readable checkpoint in workdir; ConfigError if none.
  Reads only: nothing in the workdir is renamed, moved or written."""
  setup = Setup(cfg)
  workdirs.check_not_a_file(workdir)
  workdirs.check_config(cfg, workdir, reading=True)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                 keep=cfg.train.keep_checkpoints, read_only=True)
  try:
    state, step = ckpt.restore_latest(setup.abstract_state())
  finally:
    ckpt.close()
  if state is None:
    raise ConfigError(f"workdir={workdir!r}: holds no readable checkpoint to evaluate; "
                      "train first")
  return setup, state, step


def evaluate(cfg: ExperimentConfig, workdir: str) -> dict:
  """Held-out loss of the latest checkpoint; printed and written to <workdir>/eval.json."""
  setup, state, step = load_state(cfg, workdir)
  if jax.process_index() == 0:
    workdirs.prepare(workdir)  # eval.json goes there: say so before the work, not after
  result = dict(step=step, **setup.evaluate(state))
  if jax.process_index() == 0:
    workdirs.write_json(os.path.join(workdir, "eval.json"), result)
    print(json.dumps(result))
  return result
