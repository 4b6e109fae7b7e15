"""Thinking tasks and their corpus (moe_jax/rl/thinking.py), the importance ratio at temperature
0.6 / top-p 0.9, the EOS's loss, and experiment=r1_thinking's :runlocal run end to end."""
import dataclasses
import importlib.util
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import r1_thinking, r1_thinking_sweep
from moe_jax import config, model
from moe_jax.config import ConfigError, MoEConfig, ModelConfig
from moe_jax.rl import batch as rl_batch
from moe_jax.rl import config as rl_config
from moe_jax.rl import learner, objective, rewards, rollout, tasks, thinking
from moe_jax.rl.config import RLConfig
from moe_jax.serve import Engine, sampling

import runs

PARITY = thinking.ThinkSpec("parity", 12)
ADD = thinking.ThinkSpec("add", 4, 2)


# ---- Tasks, forms and the corpus ----------------------------------------------------------------

@pytest.mark.parametrize("spec", [PARITY, ADD, thinking.ThinkSpec("add", 3, 4)])
def test_train_and_heldout_are_disjoint(spec):
  train = {thinking.canonical(p) for p in thinking.problems(spec, "train", 2000, seed=0)}
  train |= {thinking.canonical(p) for p in thinking.problems(spec, "train", 2000, seed=1)}
  held = thinking.problems(spec, "heldout", 100, seed=0, unique=True)
  assert not train & {thinking.canonical(p) for p in held}
  assert all(thinking.split_of(p, spec.heldout_fraction) == "heldout" for p in held)
  for other in thinking.other_sizes(spec):  # other sizes are held-out problems too
    assert all(thinking.split_of(p, spec.heldout_fraction) == "heldout"
               for p in thinking.problems(other, "heldout", 20, seed=0))


def test_parity_of_bit_strings_not_their_multisets_decides_the_split():
  # tasks.canonical sorts operands (sums commute); bits do not: 0011 and 1100 are two problems.
  a = tasks.Problem("parity", (0, 0, 1, 1), 0, "", "0")
  b = tasks.Problem("parity", (1, 1, 0, 0), 0, "", "0")
  assert thinking.canonical(a) != thinking.canonical(b)


@pytest.mark.parametrize("spec", [PARITY, ADD, thinking.ThinkSpec("add", 2, 5)])
def test_long_form_steps_compute_the_answer(spec):
  """Read back from the steps alone: the last running parity; the column digits and the last
  carry, most significant first."""
  for p in thinking.problems(spec, "train", 200, seed=3):
    work = thinking.steps(p)
    if p.kind == "parity":
      assert [s[0] for s in work] == [str(b) for b in p.numbers]
      assert work[-1][1] == p.answer
    else:
      sums = [int(s.split("=")[1]) for s in work]
      carries = [int(s.split("=")[0].split("+")[-1]) for s in work]
      assert carries == [0] + [x // 10 for x in sums[:-1]]
      assert [s.split("=")[0].split("+")[:-1] for s in work] == [
          [str(x // 10 ** c % 10) for x in p.numbers] for c in range(len(work))]
      digits = "".join(str(x % 10) for x in reversed(sums))
      assert int(str(sums[-1] // 10) + digits) == p.target


def test_a_self_check_writes_one_wrong_step_the_phrase_and_the_fix():
  rng = np.random.default_rng(0)
  for p in thinking.problems(ADD, "train", 50, seed=0) + \
      thinking.problems(PARITY, "train", 50, seed=0):
    plain, checked = thinking.long_think(p), thinking.long_think(p, rng, self_check=True)
    before, phrase, rest = checked.partition(thinking.SELF_CHECK)
    assert phrase and thinking.self_checks(checked) == 1
    # before the phrase: the right steps so far, then the next step with its last digit wrong;
    # after it: that step right and the rest
    assert plain.endswith(rest)
    done = plain[:len(plain) - len(rest)]
    assert before.startswith(done)
    wrong = before[len(done):]
    right = rest[:len(wrong)]
    assert wrong[:-1] == right[:-1] and wrong[-1] != right[-1] and wrong[-1].isdigit()


@pytest.mark.parametrize("long_share", [0.0, 0.05, 0.3])
def test_corpus_mixture_matches_long_share(long_share):
  n = 3000
  docs = list(thinking.documents(PARITY, n, seed=0, long_share=long_share, self_check_share=0.5))
  probs = thinking.problems(PARITY, "train", n, seed=0)
  forms, checks = [], []
  for p, d in zip(probs, docs):
    prompt = tasks.prompt(p)
    assert d.startswith(prompt) and rewards.is_correct(p, d[len(prompt):])  # answers right
    forms.append(thinking.form(p, d[len(prompt):]))
    checks.append(thinking.self_checks(d) > 0)
  share = np.mean([f == "long" for f in forms])
  se = np.sqrt(max(long_share * (1 - long_share), 1e-12) / n)
  assert abs(share - long_share) <= 4 * se
  longs = [c for f, c in zip(forms, checks) if f == "long"]
  assert not any(c for f, c in zip(forms, checks) if f == "short")
  if longs:
    assert abs(np.mean(longs) - 0.5) <= 4 * np.sqrt(0.25 / len(longs))


def test_reward_ignores_what_the_think_section_says():
  for p in thinking.problems(ADD, "train", 20, seed=0) + \
      thinking.problems(PARITY, "train", 20, seed=0):
    for answer in (p.answer, str(p.target + 1)):
      thinks = ["", thinking.long_think(p), "anything at all 123", "wait, " * 5,
                thinking.long_think(p, np.random.default_rng(1), self_check=True)]
      got = {rewards.reward(p, tasks.completion(t, answer)) for t in thinks}
      assert len(got) == 1
    assert rewards.reward(p, tasks.completion("junk", p.answer)) == 1.1


def test_form_figures_count_each_form():
  p = thinking.problems(PARITY, "train", 1, seed=0)[0]
  long_right = tasks.completion(thinking.long_think(p), p.answer)
  short_wrong = tasks.completion("", str(1 - p.target))
  checked = tasks.completion(thinking.long_think(p, None, self_check=True), p.answer)
  out = thinking.form_figures([p], [[long_right, short_wrong, checked, "no format"]])
  assert out == {"long_share": 0.5, "long_accuracy": 1.0, "short_accuracy": 0.0,
                 "self_check_rate": 0.25}


# ---- The importance ratio at temperature 0.6 / top-p 0.9, and the EOS --------------------------

def numpy_sampling_probs(logits_V, temperature, top_p):
  """The distribution the engine samples from, written out plainly."""
  z = logits_V.astype(np.float64) / temperature
  p = np.exp(z - z.max())
  p /= p.sum()
  order = np.argsort(-p, kind="stable")
  keep = np.zeros_like(p, bool)
  mass = 0.0
  for i in order:  # a token stays while the mass before it is below top_p
    if mass >= top_p:
      break
    keep[i] = True
    mass += p[i]
  q = np.where(keep, p, 0.0)
  return q / q.sum()


def test_importance_ratio_at_t06_top_p09_is_the_ratio_of_sampling_distributions():
  T_, P_, V = 0.6, 0.9, 13
  rng = np.random.default_rng(0)
  old_NxV = rng.normal(0, 2.0, (64, V)).astype(np.float32)
  new_NxV = (old_NxV + rng.normal(0, 0.7, (64, V))).astype(np.float32)
  n = len(old_NxV)
  full = lambda x: np.full(n, x)
  tokens, model_logp, behaviour = sampling.sample(
      jnp.asarray(old_NxV), full(T_).astype(np.float32), full(P_).astype(np.float32),
      full(0).astype(np.int32), np.arange(n, dtype=np.int32), full(0).astype(np.int32),
      full(0).astype(np.int32))
  tokens, behaviour = np.asarray(tokens), np.asarray(behaviour)
  new_logp = np.asarray(objective.sampling_logprobs(jnp.asarray(new_NxV)[None],
                                                    jnp.asarray(tokens)[None], T_, P_))[0]
  ratio = np.exp(new_logp - behaviour)
  want_old = np.array([numpy_sampling_probs(l, T_, P_)[t] for l, t in zip(old_NxV, tokens)])
  want_new = np.array([numpy_sampling_probs(l, T_, P_)[t] for l, t in zip(new_NxV, tokens)])
  assert (want_old > 0).all()  # the engine samples inside its nucleus
  np.testing.assert_allclose(np.exp(behaviour), want_old, rtol=1e-5)
  np.testing.assert_allclose(ratio, want_new / want_old, rtol=1e-4, atol=1e-30)
  assert (want_new == 0).any() and (ratio[want_new == 0] == 0).all()  # outside the new nucleus
  # the raw model log-prob (what the OpenAI API reports) is another quantity
  raw = np.log([np.exp(l - l.max())[t] / np.exp(l - l.max()).sum() for l, t in
                zip(old_NxV.astype(np.float64), tokens)])
  np.testing.assert_allclose(np.asarray(model_logp), raw, rtol=1e-5)
  assert np.abs(np.asarray(model_logp) - behaviour).max() > 0.1


def test_a_policy_outside_its_nucleus_gets_ratio_zero_and_finite_gradients():
  logits = jnp.asarray([[[5.0, 0.0, -1.0]]])
  tokens = jnp.asarray([[2]])
  f = lambda x: objective.policy_loss(objective.sampling_logprobs(x, tokens, 0.6, 0.9),
                                      jnp.asarray([[-1.0]]), jnp.asarray([1.0]),
                                      jnp.ones((1, 1)))[0]
  assert float(jnp.exp(objective.sampling_logprobs(logits, tokens, 0.6, 0.9))[0, 0]) == 0.0
  assert np.isfinite(np.asarray(jax.grad(f)(logits))).all()


CFG = ModelConfig(embed_dim=32, num_layers=2, first_k_dense=1, dense_ffn_dim=64, num_heads=4,
                  kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                  max_seq_len=128, init_std=0.3)
MOE = MoEConfig(embed_dim=32, num_experts=4, top_k=2, expert_ffn_dim=16)


def _experiment():
  return config.ExperimentConfig(model=CFG, moe=MOE,
                                 train=config.TrainConfig(batch_size=8, seq_len=64))


def test_rollout_and_learner_agree_at_t06_top_p09_and_the_eos_carries_loss():
  """At the behaviour's own weights the learner's ratio is 1 on every trained token (EOS
  included), and the EOS that ended a completion is in the batch with its log-prob."""
  params, state = model.init(jax.random.key(0), CFG, MOE)
  rl = RLConfig(temperature=0.6, top_p=0.9, max_tokens=24, router_replay=True)
  make = lambda p: Engine(p, state, CFG, MOE, num_blocks=96, max_batch=8, record_routes=True,
                          prefix_cache=False)
  problems = thinking.problems(thinking.ThinkSpec("parity", 8), "train", 2, seed=0)
  sample = lambda engine: rollout.sample_groups(engine, problems, 4, max_tokens=24,
                                                temperature=0.6, top_p=0.9, seed=0)
  # EOS made as likely as the token this random model writes most: some completions stop
  eos = make(params).tokenizer.eos_id
  common = np.bincount(np.concatenate([np.concatenate(g.token_ids)
                                       for g in sample(make(params))])).argmax()
  head = params["head"]["kernel"]
  params = dict(params, head={"kernel": head.at[:, eos].set(head[:, common])})
  groups = sample(make(params))
  stops = [(g, i) for g in groups for i, s in enumerate(g.stops) if s is not None]
  assert stops and all(g.stops[i][0] == eos for g, i in stops)
  batch = rl_batch.make_batch(groups, rl, 112, pad_id=CFG.pad_id)
  row = [(g, i) for g in groups for i in range(4)].index(stops[0])
  g, i = stops[0]
  at = len(g.prompt_ids) + len(g.token_ids[i])
  assert batch["tokens"][row, at] == eos and batch["mask"][row, at] == 1.0
  assert batch["behaviour_logp"][row, at] == np.float32(g.stops[i][1])
  logits = learner.logprobs(params, state, jnp.asarray(batch["tokens"]), _experiment(),
                            jnp.asarray(batch["routes"]))[1]
  new = np.asarray(learner.sampled_logprobs(logits, jnp.asarray(batch["tokens"]), rl))
  m = batch["mask"] > 0
  assert np.abs(new[m] - batch["behaviour_logp"][m]).max() < 1e-4
  # the EOS's loss: raising its behaviour log-prob changes the loss (its ratio is in it)
  loss = lambda b: float(objective.policy_loss(jnp.asarray(new), jnp.asarray(b["behaviour_logp"]),
                                               jnp.ones(len(new)), jnp.asarray(b["mask"]),
                                               loss_agg="token_mean")[0])
  moved = dict(batch, behaviour_logp=batch["behaviour_logp"].copy())
  moved["behaviour_logp"][row, at] -= 0.1
  assert loss(moved) != loss(batch)


# ---- The smoke run ------------------------------------------------------------------------------

# Slow (100-190 s here): CI's time is the limit (#31). The fast suite keeps r1_zero's end-to-end
# run, the same RL loop and engine; this study's pieces have their own tests above.
@pytest.mark.slow
def test_runlocal_end_to_end(env, tmp_path):
  workdir = str(tmp_path / "think")
  start = time.perf_counter()
  proc = runs.run(env, os.path.join(runs.REPO, "configs", "r1_thinking.py") + ":runlocal",
                  workdir, timeout=600)
  elapsed = time.perf_counter() - start
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name in ("r1_thinking.md", "r1_thinking.json", "r1_thinking.png", "eval_base.json",
               os.path.join("rl", "eval_final.json"), os.path.join("ntp", "eval_final.json")):
    assert os.path.exists(os.path.join(workdir, name)), name
  text = open(os.path.join(workdir, "r1_thinking.md")).read()
  assert "NTP-only" in text and "parity12" in text
  print(f"runlocal end to end: {elapsed:.1f}s")  # timed here, not asserted (STYLE: bench/)


def _thinking_config(arg, **rl):
  path = os.path.join(runs.REPO, "configs", "r1_thinking.py")
  spec = importlib.util.spec_from_file_location("_think_cfg", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  values = module.get_config(arg)
  values.rl.update(rl)
  return config.from_config_dict(values)


@pytest.mark.parametrize("arg, rl, message", [
    ("parity", {"max_tokens": 40}, r"rl.max_tokens=40: the long form of parity16 needs 67"),
    ("parity", {"task_digits": 99}, r"rl.task_digits=99: must be an integer in \[2, 64\]"),
    ("addition", {"task_count": 12}, r"rl.task_count=12: must be an integer in \[2, 9\]"),
    ("parity", {"long_share": 1.5}, r"rl.long_share=1.5: must be in \[0, 1\]"),
    ("parity", {"long_shares": [0.1, 0.1]}, r"rl.long_shares=\[0.1, 0.1\]: must be a list"),
])
def test_bad_thinking_settings_fail_with_one_line(arg, rl, message):
  cfg = _thinking_config(arg, **rl)
  with pytest.raises(ConfigError, match=message):
    if "long_shares" in rl:
      r1_thinking_sweep.runs_of(cfg)
    else:
      r1_thinking.make_study(cfg, rl_config.from_dict(cfg.rl))


def test_sweep_runs_one_config_per_share_and_seed():
  cfg = dataclasses.replace(_thinking_config("parity", long_shares=[0.0, 0.1]), seeds=(0, 3))
  points = r1_thinking_sweep.runs_of(cfg)
  assert [(s, seed) for s, seed, _ in points] == [(0.0, 0), (0.0, 3), (0.1, 0), (0.1, 3)]
  for share, seed, run in points:
    assert run.experiment == "r1_thinking" and "long_shares" not in run.rl
    assert run.rl["long_share"] == share and run.rl["seed"] == seed == run.train.seed
