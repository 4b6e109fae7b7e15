"""`experiment=r1_thinking`: does outcome-only RL grow a rare long form of thinking out of a base?

  python -m experiments.run --config=configs/r1_thinking.py:parity --workdir=/tmp/think

The r1_zero loop (experiments/r1_zero.py) with another study: the base corpus mixes R1-Zero's
template with an empty think section and, with probability rl.long_share, a worked derivation
(moe_jax/rl/thinking.py: running parity; column sums with carries), answers all right. RL as in
r1_zero (accuracy + format rewards; nothing reads the think section). Besides r1_zero's figures,
per RL step: the long-form share of responses, the accuracy of each form, the self-check rate,
and every rl.eval_every steps a small held-out evaluation (pass@1, cons@16, long share, length).

Held-out evaluation (before and after RL): rl.eval_problems problems x rl.eval_k samples of the
trained size (pass@1, cons@16, the unbiased pass@k for k = 1..eval_k, format rate, length, per
form figures) and 16 samples of other sizes (thinking.other_sizes).

The NTP-only control continues the base's pre-training on the same corpus for as long as the
RL phase took (wall clock: RL steps x the median RL step's seconds after the first, so
compilation does not count, over the base's median seconds per step), at the base's final
learning rate, in <workdir>/ntp, and is evaluated alike. Outputs: r1_thinking.md/.json and
r1_thinking.png in the workdir.
"""
from __future__ import annotations

import dataclasses
import os
import shutil

import numpy as np

from experiments import r1_zero, report
from moe_jax import metrics, train, workdir as workdirs
from moe_jax.config import ConfigError, ExperimentConfig
from moe_jax.rl import config as rl_config
from moe_jax.rl import batch as rl_batch
from moe_jax.rl import evaluate, rewards, rollout, tasks, thinking

SIZES_PROBLEMS, SIZES_K, DURING_PROBLEMS, DURING_K = 16, 16, 16, 16
NTP_STEPS = os.path.join("ntp", "ntp_steps.json")
CURVES = ("pass@1_all", "heldout_pass@1", "response_length_all", "long_share", "long_accuracy",
          "short_accuracy", "self_check_rate", "entropy", "kl", "reward_all")


def think_spec(rl: rl_config.RLConfig) -> thinking.ThinkSpec:
  try:
    return thinking.ThinkSpec(rl.task_kind, rl.task_digits, rl.task_count)
  except ValueError as e:
    raise ConfigError(f"rl.task_{str(e).replace('size=', 'digits=')}") from None


def budget(spec: thinking.ThinkSpec, rl: rl_config.RLConfig, seed: int = 0) -> int:
  """Response tokens the long form of `spec` needs (a self-check adds a step and the phrase)."""
  longest = max(thinking.long_length(p) for p in thinking.problems(spec, "train", 64, seed))
  extra = len(thinking.SELF_CHECK) + 2 if rl.self_check_share > 0 else 0
  return longest + extra + 1  # + EOS


def check(cfg: ExperimentConfig, rl: rl_config.RLConfig, spec: thinking.ThinkSpec):
  need = budget(spec, rl)
  if rl.max_tokens < need:
    raise ConfigError(f"rl.max_tokens={rl.max_tokens}: the long form of {spec.name} needs "
                      f"{need} tokens; give at least that")
  for other in thinking.other_sizes(spec):
    prompt = max(len(tasks.prompt(p)) for p in thinking.problems(other, "heldout", 8, 0))
    total = prompt + 1 + 8 + budget(other, rl)
    if total > cfg.model.max_seq_len:
      raise ConfigError(f"model.max_seq_len={cfg.model.max_seq_len}: the held-out size "
                        f"{other.name} needs {total} (prompt + its long form)")


def eval_len(cfg, rl, spec) -> int:
  """One engine length for every evaluation (the trained size's and the other sizes'): one
  cache pool shape, so the evaluation engines compile once."""
  need = [r1_zero.seq_len(cfg, rl, spec)]
  for other in thinking.other_sizes(spec):
    longest = max(len(tasks.prompt(p).encode("utf-8"))
                  for p in thinking.problems(other, "heldout", 16, rl.seed, unique=True))
    need.append(rl_batch.bucket(longest + 1 + 8 + budget(other, rl)))
  return min(max(need), cfg.model.max_seq_len)


def _figures(spec, engine_for, rl, count, k, ks, seed, budget_=None) -> dict:
  problems = thinking.problems(spec, "heldout", count, rl.seed, unique=True)
  tokens = budget_ or rl.max_tokens
  # the rollout engine's rows: the same batch buckets as RL's
  engine = engine_for(rl.prompts_per_step * rl.group_size)
  groups = rollout.sample_groups(engine, problems, k, max_tokens=tokens,
                                 temperature=0.6, top_p=0.95, seed=seed)
  texts = [g.texts for g in groups]
  out = evaluate.summarize(problems, texts, [[len(t) for t in g.token_ids] for g in groups],
                           ks=ks)
  correct = [[rewards.is_correct(p, t) for t in row] for p, row in zip(problems, texts)]
  out["pass@k"] = {str(j): evaluate.pass_at_k(correct, j) for j in range(1, k + 1)}
  return dict(out, **thinking.form_figures(problems, texts))


def make_study(cfg: ExperimentConfig, rl: rl_config.RLConfig) -> r1_zero.Study:
  spec = think_spec(rl)
  check(cfg, rl, spec)
  length = eval_len(cfg, rl, spec)

  def evaluate_(engine_for_T):
    engine_for = lambda rows: engine_for_T(rows, length)
    out = {"heldout": _figures(spec, engine_for, rl, rl.eval_problems, rl.eval_k,
                               sorted({min(16, rl.eval_k), rl.eval_k}), rl.seed + 12345)}
    count, k = min(SIZES_PROBLEMS, rl.eval_problems), min(SIZES_K, rl.eval_k)
    out["sizes"] = {o.name: _figures(o, engine_for, rl, count, k, (k,), rl.seed + 54321,
                                     budget(o, rl))
                    for o in thinking.other_sizes(spec)}
    return out

  def during(engine_for_T):
    engine_for = lambda rows: engine_for_T(rows, length)
    count, k = min(DURING_PROBLEMS, rl.eval_problems), min(DURING_K, rl.eval_k)
    f = _figures(spec, engine_for, rl, count, k, (k,), rl.seed + 777)
    return {"heldout_pass@1": f["pass@1"], f"heldout_cons@{DURING_K}": f[f"cons@{k}"],
            "heldout_long_share": f["long_share"], "heldout_length": f["mean_length"]}

  def step_record(groups, drawn):
    return thinking.form_figures([g.problem for g in drawn], [g.texts for g in drawn])

  write = lambda path: thinking.write_corpus(path, spec, rl.corpus_docs, rl.seed,
                                             long_share=rl.long_share,
                                             self_check_share=rl.self_check_share)
  return r1_zero.Study(spec, write, evaluate_, lambda *_: None, step_record, during)


def run(cfg: ExperimentConfig, workdir: str) -> dict:
  rl = rl_config.from_dict(cfg.rl)
  study = make_study(cfg, rl)
  r1_zero.run(cfg, workdir, study)
  before = workdirs.read_json(os.path.join(workdir, "eval_base.json"))
  after = workdirs.read_json(os.path.join(workdir, "rl", "eval_final.json"))
  ntp = ntp_control(cfg, rl, study, workdir)
  return write_report(workdir, rl, study.spec, before, after, ntp)


def ntp_control(cfg: ExperimentConfig, rl, study, workdir: str) -> dict:
  """Continues the base's pre-training for the RL phase's wall clock (module doc); its eval."""
  base_cfg, base_dir = r1_zero.base_config(cfg, workdir), os.path.join(workdir, "base")
  ntp_dir, path = os.path.join(workdir, "ntp"), os.path.join(workdir, NTP_STEPS)
  records = metrics.read_jsonl(os.path.join(workdir, "rl", metrics.METRICS_FILE))
  rates = [r["tokens_per_s"] for r in metrics.read_jsonl(os.path.join(base_dir,
                                                                      metrics.METRICS_FILE))
           if r.get("tokens_per_s")]
  t = base_cfg.train
  if not os.path.exists(path):
    # the median step after the first, not the sum: compilation is no training time
    times = [r["step_s"] for r in records]
    rl_s = float(np.median(times[1:] or times)) * len(records)
    s_per_step = t.batch_size * t.seq_len / float(np.median(rates))
    extra = max(1, int(round(rl_s / s_per_step)))
    os.makedirs(ntp_dir, exist_ok=True)
    if not os.path.exists(os.path.join(ntp_dir, "checkpoints")):
      shutil.copytree(os.path.join(base_dir, "checkpoints"),
                      os.path.join(ntp_dir, "checkpoints.tmp"))
      os.replace(os.path.join(ntp_dir, "checkpoints.tmp"), os.path.join(ntp_dir, "checkpoints"))
    workdirs.write_json(path, {"extra_steps": extra, "rl_s": rl_s, "base_s_per_step":
                               s_per_step})
  extra = workdirs.read_json(path)["extra_steps"]
  # constant at the base's last learning rate: no warm restart of its cosine schedule
  ntp_cfg = dataclasses.replace(base_cfg, train=dataclasses.replace(
      t, steps=t.steps + extra, learning_rate=t.learning_rate * t.min_lr_ratio,
      min_lr_ratio=1.0, warmup_steps=0, checkpoint_every=min(t.checkpoint_every, extra)))
  train.train(ntp_cfg, ntp_dir)
  setup, state, _ = train.load_state(ntp_cfg, ntp_dir)
  T = r1_zero.seq_len(cfg, rl, study.spec)
  key = {"eval_problems": rl.eval_problems, "eval_k": rl.eval_k, "seed": rl.seed,
         "max_tokens": rl.max_tokens, "extra_steps": extra}
  cached = r1_zero._cached  # pylint: disable=protected-access
  return cached(os.path.join(ntp_dir, "eval_final.json"),
                lambda: r1_zero.evaluate_policy(state, cfg, study, setup.mesh, T), key)


ROWS = ("pass@1", "cons@16", "format_rate", "mean_length", "long_share", "long_accuracy",
        "short_accuracy", "self_check_rate")


def _fmt(x, spec=".3f") -> str:
  """A figure; '-' for one without a value (NaN, stored in JSON as null: no response of a form)."""
  return "-" if x is None or x != x else format(x, spec)


def write_report(workdir, rl, spec, before, after, ntp) -> dict:
  k = rl.eval_k
  arms = (("base", before), (f"RL ({rl.steps} steps)", after), ("NTP-only", ntp))
  names = [n for n in ROWS + (f"pass@{k}",) if n in before["heldout"]]
  lines = [f"# R1-Zero thinking on {spec.name}: long share {rl.long_share}, self-check share "
           f"{rl.self_check_share}; held-out {rl.eval_problems} problems x {k} samples "
           "(T 0.6, top-p 0.95)", ""]
  lines += report.table(["figure"] + [a for a, _ in arms],
                        [[n] + [_fmt(d["heldout"][n]) for _, d in arms] for n in names])
  lines += ["", f"Other sizes ({min(SIZES_PROBLEMS, rl.eval_problems)} problems x "
            f"{min(SIZES_K, k)} samples): pass@1 / long "
            "share / length", ""]
  lines += report.table(["size"] + [a for a, _ in arms], [
      [name] + [" / ".join(_fmt(d["sizes"][name][key], f) for key, f in
                           (("pass@1", ".3f"), ("long_share", ".2f"), ("mean_length", ".0f")))
                for _, d in arms]
      for name in before["sizes"]])
  text = "\n".join(lines) + "\n"
  with open(os.path.join(workdir, "r1_thinking.md"), "w") as f:
    f.write(text)
  out = {"before": before, "after": after, "ntp": ntp, "rl": dataclasses.asdict(rl)}
  workdirs.write_json(os.path.join(workdir, "r1_thinking.json"), out, indent=2)
  print(text)
  plot(workdir, arms, k)
  return out


def plot(workdir, arms, k):
  records = metrics.read_jsonl(os.path.join(workdir, "rl", metrics.METRICS_FILE))
  plt = report.pyplot()
  fig, axes = plt.subplots(3, 4, figsize=(16, 10))
  for ax, name in zip(axes.flat, CURVES):
    points = [(r["step"], r[name]) for r in records if r.get(name) is not None]
    if name == "heldout_pass@1":
      more = [(r["step"], r[f"heldout_cons@{DURING_K}"]) for r in records
              if r.get(f"heldout_cons@{DURING_K}") is not None]
      if more:
        ax.plot(*zip(*more), marker=".", label=f"cons@{DURING_K}")
    if points:
      ax.plot(*zip(*points), marker="." if len(points) < 50 else None, label=name)
    ax.set_title(name)
    ax.set_xlabel("RL step")
    if name == "heldout_pass@1":
      ax.legend()
  ax = axes.flat[len(CURVES)]
  for label, d in arms:
    curve = d["heldout"]["pass@k"]
    ax.plot([int(j) for j in curve], list(curve.values()), label=label)
  ax.set_xscale("log")
  ax.set_title(f"held-out pass@k, k = 1..{k}")
  ax.legend()
  fig.tight_layout()
  report.save(fig, os.path.join(workdir, "r1_thinking.png"))
