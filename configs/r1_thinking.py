"""R1-Zero's signature on a CPU (experiments/r1_thinking.py): a base pre-trained on a mixture of
short answers and a rare long worked form, then outcome-only RL; an NTP-only control at equal
wall clock.

  python -m experiments.run --config=configs/r1_thinking.py:parity --workdir=/tmp/think_parity
  python -m experiments.run --config=configs/r1_thinking.py:addition --workdir=/tmp/think_add
  python -m experiments.run --config=configs/r1_thinking.py:parity,self_check --workdir=...
  python -m experiments.run --config=configs/r1_thinking.py:parity,no_long --workdir=... (ctrl b)
  python -m experiments.run --config=configs/r1_thinking.py:parity,seed1 --workdir=...
  python -m experiments.run --config=configs/r1_thinking.py:runlocal --workdir=/tmp/think_smoke

Variants are comma-separated: a task (parity, default; addition), then any of self_check,
no_long (rl.long_share=0: control b), seed1 (the second seed), runlocal (a smoke run).
Every run includes the NTP-only control (control a) in <workdir>/ntp.
"""
import importlib.util
import pathlib

import ml_collections

VARIANTS = ("parity", "addition", "self_check", "no_long", "seed1", "runlocal")


def _tiny(arg):
  path = pathlib.Path(__file__).with_name("tiny_moe.py")
  spec = importlib.util.spec_from_file_location("tiny_moe_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def get_config(arg=None):
  """arg: comma-separated VARIANTS (module doc)."""
  names = [a for a in (arg or "parity").split(",") if a]
  unknown = [a for a in names if a not in VARIANTS]
  if unknown or ("parity" in names and "addition" in names):
    raise ValueError(f"config arg {arg!r}: expected comma-separated {', '.join(VARIANTS)} "
                     "(at most one of parity, addition)")
  runlocal = "runlocal" in names
  config = _tiny("runlocal" if runlocal else None)
  config.experiment = "r1_thinking"
  m, t = config.model, config.train
  m.max_seq_len = 256                   # prompt + the long form, and the larger held-out sizes
  # base pre-training on the mixture. Windows of the token file are aligned, not per document:
  # 256 tokens hold a whole long document (~150-170 tokens) in about half the windows, 128 never
  t.steps, t.batch_size, t.seq_len = 1500, 16, 256
  t.warmup_steps, t.eval_every, t.checkpoint_every, t.log_every = 30, 500, 500, 50
  config.data.source = "synthetic"      # replaced by the run's own corpus

  config.rl = r = ml_collections.ConfigDict()
  r.steps = 60                          # rollout batches
  r.prompts_per_step = 8                # prompts per batch
  r.group_size = 8                      # completions per prompt (G)
  r.minibatches = 2                     # learner updates per batch
  r.learning_rate = 1e-4                # constant
  r.clip_low = 0.2                      # ratio clip below: 1 - clip_low
  r.clip_high = 0.28                    # ratio clip above: 1 + clip_high (DAPO)
  r.kl_coef = 0.0                       # no KL: the long form must be free to take over
  r.ref_update_every = 0                # steps between reference refreshes
  r.scale_advantages = True             # divide by the group's std
  r.loss_agg = "token_mean"             # DAPO
  r.drop_uniform_groups = True          # dynamic sampling
  r.max_draws = 4                       # ... rollout rounds per step at most
  r.router_replay = True                # the learner reuses the rollout's experts
  r.temperature = 1.0                   # rollout sampling
  r.top_p = 1.0
  r.max_tokens = 80                     # response budget: the long form + room (checked)
  r.task_kind = "parity"                # "parity" or "add" (moe_jax/rl/thinking.py)
  r.task_digits = 16                    # parity: bits; add: digits per operand
  r.task_count = 2                      # add: operands
  r.corpus_docs = 60000                 # pre-training documents
  r.corpus_error_rate = 0.0             # unused here: every answer in this corpus is right
  r.long_share = 0.1                    # share of documents in the long form
  r.self_check_share = 0.0              # share of long ones with a wrong step, "wait", the fix
  r.eval_problems = 32                  # held-out problems (trained size)
  r.eval_k = 64                         # samples per problem: pass@k for k = 1..64
  r.eval_every = 10                     # RL steps between small held-out evaluations
  r.checkpoint_every = 10               # RL steps between checkpoints
  r.seed = 0

  if "addition" in names:
    r.task_kind, r.task_digits, r.task_count = "add", 6, 2
    r.max_tokens = 100
  if "self_check" in names:
    r.self_check_share = 0.3
    r.max_tokens += 12
  if "no_long" in names:
    r.long_share = 0.0
  if "seed1" in names:
    r.seed, t.seed = 1, 1
  if runlocal:
    t.steps, t.batch_size, t.warmup_steps = 100, 8, 10
    t.eval_every, t.checkpoint_every, t.log_every = 100, 100, 50
    r.steps, r.prompts_per_step, r.group_size, r.minibatches = 2, 2, 4, 2
    r.corpus_docs, r.eval_problems, r.eval_k, r.eval_every = 500, 2, 4, 1
    r.checkpoint_every = 1
    r.task_digits = 8 if r.task_kind == "parity" else 2
    r.max_tokens = 56
  return config
