"""`experiment=r1_zero`: R1-Zero-style RL on the tiny MoE, from a noisy base to a better policy.

  python -m experiments.run --config=configs/r1_zero.py --workdir=/tmp/r1

1. base: a noisy task corpus (tasks.write_noisy_corpus: right and wrong answers, no worked
   reasoning) in <workdir>/corpus.tokens, the model trained on it into <workdir>/base by the
   real trainer (resumed, or skipped when finished, like any run);
2. the base evaluated on held-out problems (pass@1 over rl.eval_k samples at temperature 0.6,
   top-p 0.95, cons@k, pass@k, format rate, length) into <workdir>/eval_base.json;
3. RL in <workdir>/rl: each step samples groups through an Engine on the current parameters
   (the same arrays: no copy), scores them, and makes rl.minibatches learner updates against the
   behaviour log-probs; metrics.jsonl per step, checkpoints (resumed after a kill; SIGTERM saves
   and stops, as training does);
4. the final policy evaluated alike (rl/eval_final.json), then r1_zero.md/.json (before/after)
   and r1_zero.png (curves against RL step) in the workdir.

Another RL study on this loop passes a `Study` (its corpus, evaluation, per-step figures and
report) to `run`: experiments/r1_thinking.py.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from experiments import report
from moe_jax import checkpoint, metrics, sharding, train, workdir as workdirs
from moe_jax.config import ConfigError, DataConfig, ExperimentConfig
from moe_jax.rl import batch as rl_batch
from moe_jax.rl import config as rl_config
from moe_jax.rl import evaluate, learner, rollout, tasks, thinking
from moe_jax.serve import Engine

CORPUS = "corpus.tokens"
RL_CONFIG = os.path.join("rl", "rl_config.json")
# rl.* keys a resumed RL run may change; any other change would mix two runs in one curve.
RESUMABLE = ("steps", "checkpoint_every", "eval_problems", "eval_k")
CURVES = ("reward", "pass@1", "cons@k", "response_length", "kl", "clip_fraction", "entropy",
          "format_rate")


# Problems of a spec: the noisy tasks' or the thinking tasks' (experiments/r1_thinking.py).
PROBLEMS = {tasks.TaskSpec: tasks.problems, thinking.ThinkSpec: thinking.problems}


def problems_of(spec, split: str, count: int, seed: int, **kw) -> list[tasks.Problem]:
  return PROBLEMS[type(spec)](spec, split, count, seed, **kw)


@dataclasses.dataclass
class Study:
  """What differs between RL studies on this loop (r1_thinking builds another one):
  write_corpus(path); evaluate(engine_for) -> the held-out figures, engine_for(rows, T=None)
  giving an engine on the policy; step_record(groups, all_groups) -> more per-step figures;
  during(engine_for) -> figures every rl.eval_every steps; report(workdir, before, after)."""
  spec: Any
  write_corpus: Callable[[str], Any]
  evaluate: Callable[[Callable], dict]
  report: Callable[[str, dict, dict], None]
  step_record: Callable[[list, list], dict] = lambda groups, all_groups: {}
  during: Optional[Callable[[Callable], dict]] = None


def noisy_study(rl: rl_config.RLConfig) -> Study:
  """r1_zero's own: the noisy corpus, held-out pass@1 / cons@k / answer kinds, r1_zero.md."""
  spec = task_spec(rl)

  def evaluate_(engine_for):
    problems = tasks.problems(spec, "heldout", rl.eval_problems, rl.seed, unique=True)
    return rollout.evaluate_problems(engine_for(min(64, rl.eval_problems * rl.eval_k)),
                                     problems, rl.eval_k, max_tokens=rl.max_tokens,
                                     seed=rl.seed + 12345)

  return Study(spec, lambda path: tasks.write_noisy_corpus(path, spec, rl.corpus_docs, rl.seed,
                                                           error_rate=rl.corpus_error_rate),
               evaluate_, lambda workdir, before, after: write_report(workdir, before, after, rl))


def task_spec(rl: rl_config.RLConfig) -> tasks.TaskSpec:
  try:
    return tasks.TaskSpec(rl.task_kind, rl.task_digits, rl.task_count)
  except ValueError as e:  # TaskSpec names kind/digits/count; the config says rl.task_*
    raise ConfigError(f"rl.task_{e}") from None


def seq_len(cfg: ExperimentConfig, rl: rl_config.RLConfig, spec: tasks.TaskSpec) -> int:
  """The fixed T of every learner batch: the longest prompt seen (+ BOS) and the budget."""
  sample = problems_of(spec, "train", 256, rl.seed) + \
      problems_of(spec, "heldout", rl.eval_problems, rl.seed, unique=True)
  need = max(len(tasks.prompt(p).encode("utf-8")) for p in sample) + 1 + 8 + rl.max_tokens
  if need > cfg.model.max_seq_len:
    raise ConfigError(f"model.max_seq_len={cfg.model.max_seq_len}: must be >= {need} (the "
                      f"longest prompt + a margin + rl.max_tokens={rl.max_tokens})")
  return min(rl_batch.bucket(need), cfg.model.max_seq_len)


def make_engine(state, cfg: ExperimentConfig, mesh, rows: int, T: int, record_routes: bool):
  """An engine on the state's arrays, sized to run `rows` sequences of T tokens at once."""
  per_seq = -(-T // 16) + 1
  return Engine(state["params"], state["moe_state"], cfg.model, cfg.moe,
                num_blocks=rows * per_seq + 2, max_batch=rows, record_routes=record_routes,
                mesh=mesh if mesh.size > 1 else None)


class Learner:
  """The jitted learner step on the run's mesh, and batches placed on it."""

  def __init__(self, cfg: ExperimentConfig, rl: rl_config.RLConfig, mesh):
    self.mesh = mesh
    rows = lambda *rest: sharding.named_sharding(mesh, ("batch",) + rest)
    self.batch_shardings = {"tokens": rows("seq"), "mask": rows("seq"),
                            "behaviour_logp": rows("seq"), "advantages": rows(),
                            "routes": rows("seq", None, None)}
    self._step = jax.jit(functools.partial(learner.rl_step, cfg=cfg, rl=rl))

  def __call__(self, state, batch, ref, measure_own_routing=True):
    with jax.set_mesh(self.mesh):
      placed = {k: jax.device_put(v, self.batch_shardings[k]) for k, v in batch.items()}
      return self._step(state, placed, ref, measure_own_routing=measure_own_routing)


def rl_step(state, ref, step: int, *, cfg: ExperimentConfig, rl: rl_config.RLConfig,
            spec, T: int, update: Learner, mesh, reward_fn: Optional[Callable] = None,
            study: Optional[Study] = None) -> tuple[dict, dict]:
  """One RL step: rollouts (fresh train prompts, a pure function of (rl.seed, step)), the batch,
  rl.minibatches updates. Returns the new state and the step's record: reward and pass@1 on the
  kept groups (what the update saw) and on all groups drawn (`*_all`: what the policy does;
  dynamic sampling's kept groups are biased towards the undecided)."""
  start = time.perf_counter()
  rows = rl.prompts_per_step * rl.group_size
  engine = make_engine(state, cfg, mesh, rows, T, rl.router_replay)
  draws, drawn = [0], []

  def draw(n):
    d, draws[0] = draws[0], draws[0] + 1
    first = (step * rl.max_draws + d) * rl.prompts_per_step  # problems no other draw uses
    problems = problems_of(spec, "train", n, rl.seed, start=first)
    new = rollout.sample_groups(engine, problems, rl.group_size, max_tokens=rl.max_tokens,
                                temperature=rl.temperature, top_p=rl.top_p,
                                seed=((rl.seed * 1_000_003 + step) * rl.max_draws + d) *
                                rl.prompts_per_step,
                                reward_fn=reward_fn)
    drawn.extend(new)
    return new

  groups, stats = rl_batch.fill_groups(draw, rl.prompts_per_step,
                                       drop_uniform=rl.drop_uniform_groups,
                                       max_draws=rl.max_draws)
  rollout_s = time.perf_counter() - start
  full = rl_batch.make_batch(groups, rl, T, pad_id=cfg.model.pad_id)
  order = np.random.default_rng([rl.seed, step, 5]).permutation(rows)
  outs = []
  for i, part in enumerate(np.split(order, rl.minibatches)):
    # only the first update's rollout mismatch is recorded (below): later ones skip its forward
    state, out = update(state, {k: v[part] for k, v in full.items()}, ref,
                        measure_own_routing=i == 0)
    outs.append(jax.device_get(out))
  texts = [g.texts for g in groups]
  summary = evaluate.summarize([g.problem for g in groups], texts,
                               [[len(t) for t in g.token_ids] for g in groups],
                               ks=(rl.group_size,))
  mean = lambda key: float(np.mean([o[key] for o in outs]))
  every = evaluate.summarize([g.problem for g in drawn], [g.texts for g in drawn],
                             [[len(t) for t in g.token_ids] for g in drawn])
  record = {"step": step + 1, "loss": mean("loss"),
            "reward": float(np.mean([g.rewards for g in groups])),
            "reward_all": float(np.mean([g.rewards for g in drawn])),
            "pass@1": summary["pass@1"], "pass@1_all": every["pass@1"],
            "response_length_all": every["mean_length"], "max_draws": rl.max_draws,
            "cons@k": summary[f"cons@{rl.group_size}"],
            "format_rate": summary["format_rate"], "response_length": summary["mean_length"],
            "kl": mean("kl"), "clip_fraction": mean("clip_fraction"), "entropy": mean("entropy"),
            "grad_norm": mean("grad_norm"), "applied": mean("applied"),
            # the first update sees the rollout/learner mismatch alone (no update yet)
            "rollout_ratio": float(outs[0]["ratio_mean"]),
            "rollout_kl": float(outs[0]["behaviour_kl"]),
            "rollout_gap": float(outs[0]["behaviour_gap"]), **stats,
            "rollout_s": rollout_s, "step_s": time.perf_counter() - start}
  if "route_agreement" in outs[0]:
    record["route_agreement"] = mean("route_agreement")  # over the updates: the policy moves
    record["rollout_route_agreement"] = float(outs[0]["route_agreement"])  # the engine's vs own
    record["rollout_kl_without_replay"] = float(outs[0]["behaviour_kl_without_replay"])
    record["rollout_gap_without_replay"] = float(outs[0]["behaviour_gap_without_replay"])
  if study is not None:
    record.update(study.step_record(groups, drawn))
  return state, record


def evaluate_policy(state, cfg, study: Study, mesh, T, during=False) -> dict:
  engine_for = lambda rows, length=None: make_engine(state, cfg, mesh, rows, length or T, False)
  return (study.during if during else study.evaluate)(engine_for)


def _cached(path: str, compute: Callable[[], dict], key: dict) -> dict:
  """The JSON in path if it was written for `key`, else compute() written there."""
  old = workdirs.read_json(path) if os.path.exists(path) else None
  if isinstance(old, dict) and all(old.get(k) == v for k, v in key.items()):
    return old
  out = dict(key, **compute())
  workdirs.write_json(path, out, indent=2)
  return out


def base_config(cfg: ExperimentConfig, workdir: str) -> ExperimentConfig:
  """The pre-training run: cfg's model and train sections on the noisy corpus."""
  return dataclasses.replace(cfg, experiment="train", rl={},
                             data=DataConfig(source="tokens", path=os.path.join(workdir, CORPUS),
                                             heldout_fraction=cfg.data.heldout_fraction))


def run(cfg: ExperimentConfig, workdir: str, study: Optional[Study] = None):
  """The whole run (module doc); `study` (default noisy_study) says what differs."""
  rl = rl_config.from_dict(cfg.rl)  # every rl.* key checked before any work
  study = study or noisy_study(rl)
  T = seq_len(cfg, rl, study.spec)
  check_resumable(rl, workdir)
  with workdirs.claim(workdir):
    corpus = os.path.join(workdir, CORPUS)
    if not os.path.exists(corpus):
      study.write_corpus(corpus + ".tmp")
      os.replace(corpus + ".tmp", corpus)
    base_cfg, base_dir = base_config(cfg, workdir), os.path.join(workdir, "base")
    train.train(base_cfg, base_dir)  # its own lock, on <workdir>/base
    _run_rl(base_cfg, base_dir, rl, study, T, workdir)


def _run_rl(cfg, base_dir, rl, study, T, workdir):
  setup, base, _ = train.load_state(cfg, base_dir)
  mesh, key = setup.mesh, {"eval_problems": rl.eval_problems, "eval_k": rl.eval_k,
                           "seed": rl.seed, "max_tokens": rl.max_tokens}
  before = _cached(os.path.join(workdir, "eval_base.json"),
                   lambda: evaluate_policy(base, cfg, study, mesh, T), key)
  print(f"base on held-out: {json.dumps(before)}")
  rl_dir = os.path.join(workdir, "rl")
  os.makedirs(rl_dir, exist_ok=True)
  workdirs.write_json(os.path.join(workdir, RL_CONFIG), cfg_rl(rl), indent=2)
  copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t))
  init_opt = jax.jit(train.make_optimizer(cfg.train).init,
                     out_shardings=setup.shardings["opt_state"])
  fresh = dict(base, step=jnp.zeros((), jnp.int32), opt_state=init_opt(base["params"]))
  template = {"state": fresh, "ref": copy(base["params"])}
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                          template)
  ckpt = checkpoint.Checkpointer(os.path.join(rl_dir, "checkpoints"), keep=2)
  preempted = None
  try:
    saved, start = ckpt.restore_latest(abstract)
    if start > rl.steps:
      raise ConfigError(f"rl.steps={rl.steps}: the RL run in {rl_dir} is already at step {start}")
    run_state = saved or template
    state, ref = run_state["state"], run_state["ref"]
    if start:
      print(f"RL resumed from step {start} ({ckpt.directory}/{start})")
    log = metrics.MetricsLog(rl_dir, resume_step=start)
    update = Learner(cfg, rl, mesh)
    preemption = train._Preemption()  # pylint: disable=protected-access  (training's SIGTERM)
    try:
      for s in range(start, rl.steps):
        state, record = rl_step(state, ref, s, cfg=cfg, rl=rl, spec=study.spec, T=T,
                                update=update, mesh=mesh, study=study)
        if study.during is not None and rl.eval_every and (s + 1) % rl.eval_every == 0:
          record.update(evaluate_policy(state, cfg, study, mesh, T, during=True))
        log.write(record)
        print(f"rl step {s + 1}/{rl.steps}: reward {record['reward']:.3f} pass@1 "
              f"{record['pass@1']:.3f} kl {record['kl']:.4f} len "
              f"{record['response_length']:.1f} ({record['step_s']:.1f}s)", flush=True)
        done = s + 1
        if rl.ref_update_every and done % rl.ref_update_every == 0:
          ref = copy(state["params"])
        bad = int(state["bad_steps"])  # learner updates skipped in a row (training's guard)
        if bad >= cfg.train.max_bad_steps or (bad and done == rl.steps):  # no report on those
          train.stop_diverged(ckpt, done, bad, cfg.train.max_bad_steps, step_name="RL step",
                              counted="learner updates",
                              every=f"rl.checkpoint_every={rl.checkpoint_every}")
        if bad == 0 and (done % rl.checkpoint_every == 0 or done == rl.steps):
          ckpt.save(done, {"state": state, "ref": ref})
        ckpt.poll()
        signum = preemption.requested()
        if signum:
          ckpt.save(done, {"state": state, "ref": ref}, wait=True)
          name = signal.Signals(signum).name
          print(f"{name}: saved RL step {done} to {ckpt.directory}, exiting")
          preempted = train.Preempted(f"{name}: stopped after saving RL step {done} in "
                                      f"{rl_dir}", signum)
          break
      ckpt.wait()
    finally:
      preemption.close()
      log.close()
  finally:
    ckpt.close()
  if preempted is not None:
    raise preempted
  after = _cached(os.path.join(rl_dir, "eval_final.json"),
                  lambda: evaluate_policy(state, cfg, study, mesh, T),
                  dict(key, rl_step=rl.steps))
  study.report(workdir, before, after)


def check_resumable(rl: rl_config.RLConfig, workdir: str):
  """ConfigError naming the first rl.* key that differs from the RL run already in workdir."""
  path = os.path.join(workdir, RL_CONFIG)
  old = workdirs.read_json(path) if os.path.exists(path) else None
  if not isinstance(old, dict):
    return
  for key, value in cfg_rl(rl).items():
    if key not in RESUMABLE and key in old and old[key] != value:
      raise ConfigError(f"rl.{key}={value!r}: the RL run in {workdir} used {old[key]!r}; use "
                        "another --workdir to start a new run")


def cfg_rl(rl: rl_config.RLConfig) -> dict:
  return dataclasses.asdict(rl)


def write_report(workdir: str, before: dict, after: dict, rl: rl_config.RLConfig):
  k = rl.eval_k
  names = ["pass@1", f"cons@{k}", f"pass@{k}", "format_rate", "mean_length"]
  rows = [[n, f"{before[n]:.3f}", f"{after[n]:.3f}", f"{after[n] - before[n]:+.3f}"]
          for n in names]
  lines = [f"# R1-Zero on {rl.task_kind} ({rl.task_count} operands of {rl.task_digits} "
           f"digit(s)): held-out, {rl.eval_problems} problems x {k} samples (T 0.6, top-p 0.95)",
           ""]
  lines += report.table(["figure", "base", f"after {rl.steps} RL steps", "change"], rows)
  if "answers" in before and "answers" in after:  # add/mul: what RL changed in the noisy base
    lines += ["", "Answers by kind (evaluate.answer_kind), share of all samples:", ""]
    lines += report.table(["kind", "base", f"after {rl.steps} RL steps"],
                          [[n, f"{before['answers'][n]:.3f}", f"{after['answers'][n]:.3f}"]
                           for n in evaluate.ANSWER_KINDS])
  text = "\n".join(lines) + "\n"
  with open(os.path.join(workdir, "r1_zero.md"), "w") as f:
    f.write(text)
  workdirs.write_json(os.path.join(workdir, "r1_zero.json"),
                      {"before": before, "after": after, "rl": cfg_rl(rl)}, indent=2)
  print(text)
  records = metrics.read_jsonl(os.path.join(workdir, "rl", metrics.METRICS_FILE))
  plt = report.pyplot()
  fig, axes = plt.subplots(2, 4, figsize=(16, 7))
  for ax, name in zip(axes.flat, CURVES):
    for key in (name, f"{name}_all"):  # reward, pass@1: kept groups and all groups drawn
      points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
      if points:
        ax.plot(*zip(*points), marker="." if len(points) < 50 else None, label=key)
    if any(r.get(f"{name}_all") is not None for r in records):
      ax.legend()
    ax.set_title(name if name != "cons@k" else f"cons@{rl.group_size} (batch)")
    ax.set_xlabel("RL step")
  fig.tight_layout()
  report.save(fig, os.path.join(workdir, "r1_zero.png"))
