"""R1-Zero-style RL (experiments/r1_zero.py): a noisy base pre-trained on sums of four digits whose
answers are wrong with probability 0.6 (39% right, 52% written backwards, 9% near misses where
backwards reads the same), then GRPO with the rule rewards, evaluated on held-out problems.

  python -m experiments.run --config=configs/r1_zero.py --workdir=/tmp/r1          (~33 min on 2 cores)
  python -m experiments.run --config=configs/r1_zero.py:runlocal --workdir=/tmp/r1_smoke
  python -m experiments.run --config=configs/r1_zero.py:paper ...   (R1-Zero's settings, at scale)
"""
import importlib.util
import pathlib

import ml_collections


def _tiny(arg):
  path = pathlib.Path(__file__).with_name("tiny_moe.py")
  spec = importlib.util.spec_from_file_location("tiny_moe_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def get_config(arg=None):
  """arg: "runlocal" (a minute-long smoke run) or "paper" (R1-Zero's published RL settings)."""
  if arg not in (None, "runlocal", "paper"):
    raise ValueError(f"config arg {arg!r}: expected nothing, 'runlocal' or 'paper'")
  config = _tiny("runlocal" if arg == "runlocal" else None)
  config.experiment = "r1_zero"
  m, t = config.model, config.train
  m.max_seq_len = 144                   # prompt (~73 bytes) + a margin + the response budget
  # base pre-training on the noisy corpus. Sums set in slowly: after 800 steps of 32 x 128 tokens
  # 20% of held-out sums of four digits come out right (greedy), and plain 2-digit addition is at
  # 5% after 1,500 steps even on clean answers (BUILD_NOTES.md, "R1-Zero")
  t.steps, t.batch_size, t.seq_len = 2400, 32, 128
  t.warmup_steps, t.eval_every, t.checkpoint_every, t.log_every = 30, 500, 500, 50
  config.data.source = "synthetic"      # replaced by the run's own corpus (experiments/r1_zero)

  config.rl = r = ml_collections.ConfigDict()
  r.steps = 150                         # rollout batches
  r.prompts_per_step = 8                # prompts per batch
  r.group_size = 8                      # completions per prompt (G)
  r.minibatches = 2                     # learner updates per batch
  r.learning_rate = 1e-4                # constant (3e-4 drifted a weak base away from its answers)
  r.clip_low = 0.2                      # ratio clip below: 1 - clip_low
  r.clip_high = 0.28                    # ratio clip above: 1 + clip_high (DAPO)
  r.kl_coef = 0.001                     # k3 KL to the reference (R1-Zero's)
  r.ref_update_every = 0                # steps between reference refreshes; 0 = frozen base
  r.scale_advantages = True             # divide by the group's std
  r.loss_agg = "token_mean"             # DAPO; or "seq_mean_token_mean", "seq_mean_token_sum_norm"
  r.drop_uniform_groups = True          # dynamic sampling
  r.router_replay = True                # the learner reuses the rollout's experts
  r.temperature = 1.0                   # rollout sampling
  r.top_p = 1.0
  r.max_tokens = 48                     # response budget (tokens = bytes)
  r.task_kind = "add"                   # "add", "mul" or "countdown"
  r.task_digits = 1                     # digits per operand
  r.task_count = 4                      # operands
  r.corpus_docs = 100000                # noisy pre-training documents
  r.corpus_error_rate = 0.6             # share with a wrong answer (backwards, or a near miss)
  r.eval_problems = 64                  # held-out problems
  r.eval_k = 16                         # samples per problem
  r.checkpoint_every = 10               # RL steps between checkpoints
  r.seed = 0

  if arg == "runlocal":
    # 300 base steps: enough for the format (format rate 1.0), not for the sums
    t.steps, t.batch_size, t.warmup_steps = 300, 8, 10
    t.eval_every, t.checkpoint_every, t.log_every = 300, 300, 100
    r.steps, r.prompts_per_step, r.group_size, r.minibatches = 3, 2, 4, 2
    r.corpus_docs, r.eval_problems, r.eval_k = 2000, 4, 4
    r.checkpoint_every = 2
  elif arg == "paper":  # DeepSeek-R1-Zero's published RL settings
    r.group_size, r.learning_rate, r.kl_coef = 16, 3e-6, 0.001
    r.clip_low = r.clip_high = 10.0
    r.ref_update_every, r.temperature = 400, 1.0
  return config
