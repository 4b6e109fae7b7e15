"""A short trial of experiment=r1_thinking's design on the TRAIN split only (never held-out):
does a base pre-trained on the mixture write the format and the long form, and how right is
each form; and what a base step and an RL step cost. One JSON object per line.

  PYTHONPATH=. python bench/r1_thinking_trial.py --variant=parity --steps=400 --long_share=0.1

configs/r1_thinking.py's model and base settings (train.steps replaced by --steps). Samples at
the RL temperature (1.0) on train problems the corpus did not use (indices after it). Times are
wall seconds and this process's CPU seconds (on a shared machine the CPU seconds say more).
"""
import argparse
import importlib.util
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import r1_thinking, r1_zero
from moe_jax import config, metrics, train
from moe_jax.rl import config as rl_config
from moe_jax.rl import evaluate, rollout, thinking

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _line(name, **fields):
  print(json.dumps({"bench": f"r1_thinking_trial.{name}", **fields,
                    "platform": jax.default_backend(), "jax": jax.__version__}), flush=True)


def _config(variant, overrides):
  spec = importlib.util.spec_from_file_location("_think",
                                                os.path.join(_REPO, "configs", "r1_thinking.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  values = module.get_config(variant)
  for key, value in overrides.items():
    section, name = key.split(".")
    values[section][name] = value
  return config.from_config_dict(values)


def _clock():
  return time.perf_counter(), time.process_time()


def _since(start):
  return {"wall_s": time.perf_counter() - start[0], "cpu_s": time.process_time() - start[1]}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--variant", default="parity")
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--long_share", type=float, default=0.1)
  parser.add_argument("--docs", type=int, default=20000)
  parser.add_argument("--problems", type=int, default=32)
  parser.add_argument("--rl_steps", type=int, default=3)
  parser.add_argument("--workdir", default="")
  args = parser.parse_args()
  cfg = _config(args.variant, {"train.steps": args.steps, "rl.long_share": args.long_share,
                               "rl.corpus_docs": args.docs})
  rl = rl_config.from_dict(cfg.rl)
  study = r1_thinking.make_study(cfg, rl)
  workdir = args.workdir or tempfile.mkdtemp(prefix="think_trial_")
  corpus = os.path.join(workdir, r1_zero.CORPUS)
  if not os.path.exists(corpus):
    study.write_corpus(corpus)
  base_cfg, base_dir = r1_zero.base_config(cfg, workdir), os.path.join(workdir, "base")
  start = _clock()
  train.train(base_cfg, base_dir)
  rates = [r["tokens_per_s"] for r in metrics.read_jsonl(os.path.join(base_dir,
                                                                      metrics.METRICS_FILE))
           if r.get("tokens_per_s")]
  t = base_cfg.train
  _line("base", steps=args.steps, batch=t.batch_size, seq_len=t.seq_len, spec=study.spec.name,
        long_share=args.long_share, s_per_step=t.batch_size * t.seq_len / float(np.median(rates)),
        **_since(start))

  setup, state, _ = train.load_state(base_cfg, base_dir)
  T = r1_zero.seq_len(cfg, rl, study.spec)
  problems = thinking.problems(study.spec, "train", args.problems, rl.seed, start=args.docs)
  engine = r1_zero.make_engine(state, cfg, setup.mesh, 64, T, False)
  start = _clock()
  groups = rollout.sample_groups(engine, problems, 8, max_tokens=rl.max_tokens,
                                 temperature=rl.temperature, top_p=rl.top_p, seed=99)
  texts = [g.texts for g in groups]
  out = evaluate.summarize(problems, texts, [[len(x) for x in g.token_ids] for g in groups],
                           ks=(8,))
  _line("train_split_samples", problems=args.problems, k=8, temperature=rl.temperature,
        **out, **thinking.form_figures(problems, texts), **_since(start),
        example=texts[0][0])

  update = r1_zero.Learner(base_cfg, rl, setup.mesh)
  state = dict(state, step=jnp.zeros((), jnp.int32),
               opt_state=train.make_optimizer(base_cfg.train).init(state["params"]))
  for s in range(args.rl_steps):
    start = _clock()
    state, record = r1_zero.rl_step(state, None, s, cfg=base_cfg, rl=rl, spec=study.spec, T=T,
                                    update=update, mesh=setup.mesh, study=study)
    _line("rl_step", step=s + 1, compiles=s == 0, T=T, rollouts=rl.prompts_per_step *
          rl.group_size, max_tokens=rl.max_tokens, draws=record["draws"],
          rollout_s=record["rollout_s"], **_since(start),
          **{k: record[k] for k in ("pass@1_all", "response_length_all", "long_share")})


if __name__ == "__main__":
  main()
