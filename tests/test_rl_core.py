"""Tests for the foundations of moe_jax.rl: tasks, rewards, the objective and evaluation, each
against hand-computed values."""
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import data
from moe_jax.config import DataConfig
from moe_jax.rl import evaluate, objective, rewards, tasks

ADD = tasks.TaskSpec("add", digits=2, count=2)
MUL = tasks.TaskSpec("mul", digits=2, count=2)
COUNTDOWN = tasks.TaskSpec("countdown", digits=1, count=3)


def _countdown(numbers, target):
  return tasks.Problem("countdown", tuple(numbers), target, "q", "")


def _answer(doc):
  return re.findall(r"<answer>(.*?)</answer>", doc)[-1]  # the prompt names the tags too


# ---- Tasks --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(kind="div"), "kind='div': must be one of 'add', 'mul', 'countdown'"),
    (dict(digits=0), "digits=0: must be an integer in [1, 9]"),
    (dict(kind="mul", count=4), "count=4: must be an integer in [2, 3] for kind='mul'"),
    (dict(heldout_fraction=1.0), "heldout_fraction=1.0: must be a number in (0, 1)"),
])
def test_task_spec_rejects_bad_values(kwargs, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    tasks.TaskSpec(**kwargs)


def test_problems_are_a_pure_function_of_seed_and_index():
  for spec in (ADD, MUL, COUNTDOWN):
    a = tasks.problems(spec, "train", 6, seed=3)
    assert a == tasks.problems(spec, "train", 6, seed=3)
    assert a[2:] == tasks.problems(spec, "train", 4, seed=3, start=2)
    assert a != tasks.problems(spec, "train", 6, seed=4)
    assert all(p.kind == spec.kind and len(p.numbers) == spec.count for p in a)
    assert all(tasks.check_answer(p, p.answer) for p in a)


def test_splits_share_no_problem_under_any_seeds():
  # One-digit addition has 55 problems up to operand order: a small space shows overlaps if any.
  spec = tasks.TaskSpec("add", digits=1, count=2, heldout_fraction=0.3)
  train = {tasks.canonical(p) for s in range(3) for p in tasks.problems(spec, "train", 100, s)}
  held = {tasks.canonical(p) for s in range(3) for p in tasks.problems(spec, "heldout", 100, s)}
  assert train and held and not train & held
  swapped = tasks.Problem("add", (7, 3), 10, "", "10")
  assert tasks.canonical(swapped) == tasks.canonical(tasks.Problem("add", (3, 7), 10, "", "10"))
  unique = tasks.problems(spec, "heldout", len(held), 0, unique=True)
  assert len({tasks.canonical(p) for p in unique}) == len(held)
  with pytest.raises(ValueError, match="count=.*exceeds the distinct heldout problems"):
    tasks.problems(spec, "heldout", 56, 0, unique=True)


def test_problem_text_and_prompt():
  p = tasks.Problem("add", (47, 85), 132, "What is 47+85?", "132")
  assert tasks.prompt(p) == ("What is 47+85? Think in <think></think>, answer in "
                             "<answer></answer>.\n")
  assert tasks.completion("47+85", "132") == "<think>47+85</think> <answer>132</answer>"
  (q,) = tasks.problems(MUL, "heldout", 1, 0)
  assert q.question == f"What is {q.numbers[0]}*{q.numbers[1]}?"
  assert q.target == q.numbers[0] * q.numbers[1] and q.answer == str(q.target)
  (c,) = tasks.problems(COUNTDOWN, "train", 1, 0)
  assert c.question.startswith(f"Make {c.target} from {' '.join(map(str, c.numbers))} with")


@pytest.mark.parametrize("text, value, used", [
    ("(1+2)*6", 18, [1, 2, 6]),
    ("2*3+4*5", 26, [2, 3, 4, 5]),
    ("10-2-3", 5, [10, 2, 3]),        # left-associative
    ("2-(3-4)*5", 7, [2, 3, 4, 5]),
    (" 7 ", 7, [7]),
    ("((0))", 0, [0]),
])
def test_parse_expression(text, value, used):
  assert tasks.parse_expression(text) == (value, used)


@pytest.mark.parametrize("text", ["2**3", "07", "-3", "(1+2", "1+", "", "1/2", "2 3", "()",
                                  "__import__('os')", "1+2)", "1" * 201])
def test_parse_expression_rejects_other_text(text):
  with pytest.raises(ValueError, match="expression="):
    tasks.parse_expression(text)


def test_check_answer():
  add = tasks.Problem("add", (86, 81), 167, "What is 86+81?", "167")
  assert tasks.check_answer(add, "167") and tasks.check_answer(add, " 167\n")
  for wrong in ("0167", "+167", "167.0", "1 67", "166", "", "86+81"):
    assert not tasks.check_answer(add, wrong), wrong
  p = _countdown((2, 4, 6), 22)
  for right in ("6*4-2", "4*6-2", "(6*4)-2", " 6 * 4 - 2 "):
    assert tasks.check_answer(p, right), right
  for wrong in ("6*4-2+0", "6*6-14", "22", "6*4-2*1", "6*4", "6*4-2-2", "6 4 2", "import os"):
    assert not tasks.check_answer(p, wrong), wrong
  twice = _countdown((3, 3, 5), 14)
  assert tasks.check_answer(twice, "3*3+5") and not tasks.check_answer(twice, "3*3*3-13")
  assert tasks.answer_key(p, "4*6-2") == tasks.answer_key(p, "(6*4)-2") == "22"
  assert tasks.answer_key(p, "6*4") == "24"
  assert tasks.answer_key(p, "6*4+1") == "invalid:6*4+1"   # 1 is not given
  assert tasks.answer_key(add, " 0167 ") == "invalid:0167"


def test_wrong_answers_are_wrong_and_near():
  rng = np.random.default_rng(0)
  for spec in (ADD, MUL, COUNTDOWN):
    for p in tasks.problems(spec, "train", 50, 1):
      wrong = tasks.wrong_answer(rng, p)
      assert not tasks.check_answer(p, wrong), (p, wrong)
      if spec.kind != "countdown":
        palindrome = p.answer == p.answer[::-1]
        assert wrong == p.answer[::-1] or palindrome and abs(len(wrong) - len(p.answer)) <= 1
      else:
        tasks.parse_expression(wrong)  # still an expression


def test_noisy_documents():
  docs = list(tasks.noisy_documents([ADD, MUL], 200, seed=5, error_rate=0.5))
  assert docs == list(tasks.noisy_documents([ADD, MUL], 200, seed=5, error_rate=0.5))
  adds = tasks.problems(ADD, "train", 100, 5)
  assert [d.split("\n")[0] for d in docs[::2]] == [tasks.prompt(p)[:-1] for p in adds]
  assert docs[0] == tasks.prompt(adds[0]) + tasks.completion(
      adds[0].question[8:-1], _answer(docs[0]))
  right = [tasks.check_answer(p, _answer(d)) for p, d in zip(adds, docs[::2])]
  assert 0.35 < np.mean(right) < 0.65
  assert max(len(d.encode()) for d in docs) <= 128  # the small levels fit a short context
  with pytest.raises(ValueError, match=re.escape("seed=-1: must be an integer >= 0")):
    tasks.problem(ADD, "train", -1, 0)
  with pytest.raises(ValueError, match=re.escape("split='test': must be one of 'train', ")):
    tasks.problem(ADD, "test", 0, 0)
  assert all(tasks.check_answer(p, _answer(d)) for p, d in zip(
      adds, tasks.noisy_documents(ADD, 100, 5, error_rate=0.0)))
  assert not any(tasks.check_answer(p, _answer(d)) for p, d in zip(
      adds, tasks.noisy_documents(ADD, 100, 5, error_rate=1.0)))
  with pytest.raises(ValueError, match=re.escape("error_rate=1.5: must be a number in [0, 1]")):
    next(tasks.noisy_documents(ADD, 1, 0, error_rate=1.5))


def test_noisy_corpus_is_a_token_source(tmp_path):
  path = str(tmp_path / "noisy.tok")
  docs = list(tasks.noisy_documents(COUNTDOWN, 20, seed=2))
  count = tasks.write_noisy_corpus(path, COUNTDOWN, 20, seed=2)
  tokens = np.asarray(data.read_tokens(path))
  assert count == len(tokens) == sum(len(d.encode()) + 2 for d in docs)
  starts = np.flatnonzero(tokens == data.BOS)
  assert len(starts) == 20 and (tokens[starts[1:] - 1] == data.EOS).all()
  assert [data.decode(tokens[a:b]) for a, b in zip(starts, list(starts[1:]) + [count])] == docs
  dataset = data.load_dataset(DataConfig(source="tokens", path=path, heldout_fraction=0.1))
  assert len(dataset.train) + len(dataset.heldout) == count


# ---- Rewards ------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, answer", [
    ("<think>47+85</think> <answer>132</answer>", "132"),
    ("  <think></think><answer> 132 </answer>\n\n", "132"),
    ("<think>a\nb < c</think>\n<answer>6*4-2</answer>", "6*4-2"),
    ("<think>x</think><answer>1</answer>", "1"),
])
def test_well_formed_responses(text, answer):
  assert rewards.format_ok(text) and rewards.extract_answer(text) == answer


@pytest.mark.parametrize("text", [
    "",
    "132",
    "<answer>132</answer>",                                  # no thinking
    "<think>47+85</think>",                                  # no answer
    "<think>47+85</think> <answer>132",                      # cut at the stop string
    "<think>x</think> <answer> </answer>",                   # empty answer
    "so <think>x</think> <answer>1</answer>",                # text before
    "<think>x</think> <answer>1</answer> done",              # text after
    "<think>x</think> so <answer>1</answer>",                # text between
    "<think>x</think> <answer>1</answer><answer>2</answer>",  # two answers
    "<think>x<think>y</think> <answer>1</answer>",           # a tag inside the thinking
    "<think>x</think></think> <answer>1</answer>",
    "<think>x</think> <answer>1<think></answer>",            # a tag inside the answer
    "<answer>1</answer> <think>x</think>",                   # wrong order
    "<Think>x</Think> <answer>1</answer>",                   # tags are case-sensitive
])
def test_malformed_responses(text):
  assert not rewards.format_ok(text) and rewards.extract_answer(text) is None


def test_rewards():
  add = tasks.Problem("add", (86, 81), 167, "What is 86+81?", "167")
  right, wrong, bad = ("<think>t</think> <answer>167</answer>",
                       "<think>t</think> <answer>168</answer>", "<answer>167</answer>")
  assert rewards.is_correct(add, right) and not rewards.is_correct(add, wrong)
  assert not rewards.is_correct(add, bad)  # right, but outside the format
  assert [rewards.reward(add, t) for t in (right, wrong, bad)] == [1.1, 0.1, 0.0]
  got = rewards.rewards([add] * 3, [right, wrong, bad], accuracy=2.0, format_bonus=0.0,
                        format_penalty=0.5)
  assert got.dtype == np.float64 and got.tolist() == [2.0, 0.0, -0.5]
  p = _countdown((2, 4, 6), 22)
  assert rewards.reward(p, "<think>6*4=24</think><answer>(6*4)-2</answer>") == 1.1
  with pytest.raises(ValueError, match=re.escape("format_bonus=nan: must be a finite number")):
    rewards.reward(add, right, format_bonus=float("nan"))
  with pytest.raises(ValueError, match=re.escape("texts=1 completions: must match problems=2")):
    rewards.rewards([add, add], [right])


# ---- Objective ----------------------------------------------------------------------------------
# Two sequences of three positions: row 0's last position is padding (NaN there must not leak),
# row 1 is all completion. Behaviour log-probs are 0, so each ratio is exp(logp).
RATIO = [[1.5, 0.5, 1.0], [1.1, 0.7, 2.0]]
LOGP = np.log(RATIO).astype(np.float32)
LOGP[0, 2] = np.nan
OLD = np.zeros((2, 3), np.float32)
ADV = np.array([1.0, -2.0], np.float32)
MASK = np.array([[1, 1, 0], [1, 1, 1]], np.float32)
# clip_low=0.2, clip_high=0.3, so clip(ratio) lies in [0.8, 1.3]; per-token -min(rA, clip(r)A):
#   row 0 (A=1):  -min(1.5, 1.3) = -1.3 (clipped high), -min(0.5, 0.8) = -0.5
#   row 1 (A=-2): -min(-2.2, -2.2) = 2.2, -min(-1.4, -1.6) = 1.6 (clipped low), -min(-4, -2.6) = 4
ROW_SUMS, ROW_COUNTS = (-1.8, 7.8), (2, 3)
CLIPS = dict(clip_low=0.2, clip_high=0.3)


def test_group_advantages():
  r = np.array([[1.0, 0.0, 0.0, 0.0], [2.0, 4.0, 4.0, 2.0], [0.1, 0.1, 0.1, 0.1]], np.float32)
  # Row 0: mean 0.25, population std sqrt(0.25 * 0.75); row 1: mean 3, std 1.
  std0 = math.sqrt(0.1875) + 1e-6
  want = [[0.75 / std0, -0.25 / std0, -0.25 / std0, -0.25 / std0],
          [-1 / (1 + 1e-6), 1 / (1 + 1e-6), 1 / (1 + 1e-6), -1 / (1 + 1e-6)], [0, 0, 0, 0]]
  np.testing.assert_allclose(objective.group_advantages(r), want, rtol=0, atol=1e-6)
  got = objective.group_advantages(r, scale=False)
  np.testing.assert_allclose(got, [[0.75, -0.25, -0.25, -0.25], [-1, 1, 1, -1], [0, 0, 0, 0]],
                             rtol=0, atol=1e-6)
  assert (np.asarray(got)[2] == 0).all()  # exactly, though 0.1 * 4 / 4 is not 0.1 in floats
  assert objective.uniform_groups(r).tolist() == [False, False, True]
  with pytest.raises(ValueError, match=re.escape("rewards_NxG.shape=(4,): must be [groups")):
    objective.group_advantages(r[0])


def test_k3_kl():
  logp = np.array([[0.0, 0.0, 1.0, -3.0]], np.float32)
  ref = np.array([[0.0, math.log(2), 0.0, -3.0]], np.float32)
  np.testing.assert_allclose(objective.k3_kl(logp, ref),
                             [[0.0, 2 - math.log(2) - 1, math.exp(-1), 0.0]], rtol=0, atol=1e-6)
  # A rollout/learner mismatch is tiny: in float32 exp(d) - d - 1 would round it to 0 or below.
  d = np.array([[1e-5, -3e-5, 2e-4]])
  tiny = objective.k3_kl(np.zeros((1, 3), np.float32), d.astype(np.float32))
  np.testing.assert_allclose(tiny, np.expm1(d) - d, rtol=1e-2)


@pytest.mark.parametrize("loss_agg, max_len, want", [
    ("seq_mean_token_mean", None, (-1.8 / 2 + 7.8 / 3) / 2),
    ("token_mean", None, (-1.8 + 7.8) / 5),
    ("seq_mean_token_sum_norm", 4, (-1.8 / 4 + 7.8 / 4) / 2),
    ("seq_mean_token_sum_norm", None, (-1.8 / 3 + 7.8 / 3) / 2),
])
@pytest.mark.parametrize("jit", [False, True])
def test_policy_loss_aggregations(loss_agg, max_len, want, jit):
  fn = functools.partial(objective.policy_loss, loss_agg=loss_agg, max_len=max_len, **CLIPS)
  loss, metrics = (jax.jit(fn) if jit else fn)(LOGP, OLD, ADV, MASK)
  np.testing.assert_allclose(loss, want, rtol=0, atol=1e-6)
  np.testing.assert_allclose(metrics["pg_loss"], want, rtol=0, atol=1e-6)
  np.testing.assert_allclose(metrics["ratio_mean"], (1.5 + 0.5 + 1.1 + 0.7 + 2.0) / 5, atol=1e-6)
  # KL(behaviour || policy) by k3 of each ratio r: r - log r - 1
  k3 = [r - math.log(r) - 1 for r in (1.5, 0.5, 1.1, 0.7, 2.0)]
  np.testing.assert_allclose(metrics["behaviour_kl"], sum(k3) / 5, rtol=0, atol=1e-6)
  np.testing.assert_allclose(metrics["behaviour_gap"], math.log(2), rtol=0, atol=1e-6)
  np.testing.assert_allclose(metrics["clip_high_fraction"], 1 / 5, rtol=0, atol=1e-6)
  np.testing.assert_allclose(metrics["clip_low_fraction"], 1 / 5, rtol=0, atol=1e-6)
  np.testing.assert_allclose(metrics["clip_fraction"], 2 / 5, rtol=0, atol=1e-6)
  assert metrics["kl"] == 0 and metrics["tokens"] == 5


def test_policy_loss_kl_penalty():
  d = np.array([[0.0, math.log(2), 5.0], [-1.0, 0.0, math.log(2)]], np.float32)
  k3 = [[0.0, 1 - math.log(2)], [math.exp(-1), 0.0, 1 - math.log(2)]]  # by hand, masked-in only
  loss, metrics = objective.policy_loss(LOGP, OLD, ADV, MASK, kl_coef=0.1, ref_logp_BxT=LOGP + d,
                                        loss_agg="token_mean", **CLIPS)
  mean_k3 = (sum(k3[0]) + sum(k3[1])) / 5
  np.testing.assert_allclose(metrics["kl"], mean_k3, rtol=0, atol=1e-6)
  np.testing.assert_allclose(loss, 6.0 / 5 + 0.1 * mean_k3, rtol=0, atol=1e-6)
  loss, _ = objective.policy_loss(LOGP, OLD, ADV, MASK, kl_coef=0.1, ref_logp_BxT=LOGP + d,
                                  **CLIPS)
  want = ((-1.8 + 0.1 * sum(k3[0])) / 2 + (7.8 + 0.1 * sum(k3[1])) / 3) / 2
  np.testing.assert_allclose(loss, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("loss_agg", objective.LOSS_AGGS)
def test_uniform_group_has_zero_gradient(loss_agg):
  rewards_NxG = np.array([[0.1, 0.1, 0.1], [0.0, 1.1, 0.1]], np.float32)
  adv_B = objective.group_advantages(rewards_NxG).reshape(-1)
  rng = np.random.default_rng(0)
  logp = jnp.asarray(rng.normal(size=(6, 4)) - 2, jnp.float32)
  old = logp + jnp.asarray(rng.normal(size=(6, 4)) * 0.3, jnp.float32)
  ref = logp + jnp.asarray(rng.normal(size=(6, 4)) * 0.3, jnp.float32)
  mask = np.ones((6, 4), np.float32)
  grad = jax.grad(lambda lp: objective.policy_loss(
      lp, old, adv_B, mask, ref_logp_BxT=ref, kl_coef=0.0, loss_agg=loss_agg)[0])(logp)
  assert (np.asarray(grad)[:3] == 0).all()      # exactly: the uniform group
  assert (np.abs(np.asarray(grad)[3:]) > 0).any()


@pytest.mark.parametrize("loss_agg", objective.LOSS_AGGS)
def test_masked_tokens_carry_no_loss_or_gradient(loss_agg):
  fn = lambda lp, old, ref: objective.policy_loss(lp, old, ADV, MASK, kl_coef=0.5,
                                                  ref_logp_BxT=ref, loss_agg=loss_agg)[0]
  ref = np.full((2, 3), -1.0, np.float32)
  loss, grads = jax.value_and_grad(fn, argnums=(0, 1, 2))(LOGP, OLD, ref)
  assert np.isfinite(loss) and all(np.isfinite(g).all() for g in grads)
  assert all(g[0, 2] == 0 for g in grads)
  # Anything at the masked position (here -inf and huge values) changes nothing.
  junk = lambda x: np.where(MASK > 0, x, np.float32(-np.inf)).astype(np.float32)
  assert fn(junk(LOGP), junk(OLD), junk(ref)) == loss
  assert fn(LOGP, OLD + 1e9 * (1 - MASK), ref) == loss


def test_policy_loss_rejects_bad_arguments():
  cases = [
      (dict(loss_agg="mean"), "loss_agg='mean': must be one of 'seq_mean_token_mean', "),
      (dict(clip_low=-0.1), "clip_low=-0.1: must be a number in [0.0, inf]"),
      (dict(clip_high=-0.1), "clip_high=-0.1: must be a number in [0.0, inf]"),
      (dict(kl_coef=-1), "kl_coef=-1: must be a number in [0.0, inf]"),
      (dict(loss_agg="seq_mean_token_sum_norm", max_len=0), "max_len=0: must be an integer >= 1"),
      (dict(ref_logp_BxT=OLD[:, :2]), "ref_logp_BxT.shape=(2, 2): must equal logp_BxT.shape="),
  ]
  for kwargs, message in cases:
    with pytest.raises(ValueError, match=re.escape(message)):
      objective.policy_loss(LOGP, OLD, ADV, MASK, **kwargs)
  with pytest.raises(ValueError, match=re.escape("advantages_B.shape=(3,): must be (2,)")):
    objective.policy_loss(LOGP, OLD, np.zeros(3, np.float32), MASK)


def test_masks_log_probs_and_entropy():
  mask = objective.completion_mask(np.array([2, 0]), np.array([4, 3]), 5)
  assert np.asarray(mask).tolist() == [[0, 0, 1, 1, 0], [1, 1, 1, 0, 0]]
  logits = np.array([[[0.0, math.log(3)], [0.0, 0.0], [7.0, 1.0]]], np.float32)
  np.testing.assert_allclose(objective.token_logprobs(logits, np.array([[1, 0, 1]])),
                             [[math.log(0.75), math.log(0.5), -6 - math.log1p(math.exp(-6))]],
                             rtol=0, atol=1e-6)
  h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
  np.testing.assert_allclose(objective.entropy(logits, np.array([[1, 1, 0]])),
                             (h + math.log(2)) / 2, rtol=0, atol=1e-6)


# ---- Evaluation ---------------------------------------------------------------------------------

def test_unbiased_pass_at_k():
  # 1 - C(3,2) / C(5,2) = 1 - 3/10
  assert evaluate.unbiased_pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10, abs=1e-12)
  assert evaluate.unbiased_pass_at_k(5, 2, 1) == pytest.approx(2 / 5, abs=1e-12)
  assert evaluate.unbiased_pass_at_k(16, 0, 8) == 0.0
  assert evaluate.unbiased_pass_at_k(4, 1, 4) == 1.0     # any 4 of 4 include the correct one
  assert evaluate.unbiased_pass_at_k(4, 4, 1) == 1.0
  # n in the hundreds: the binomials overflow a float, the product does not.
  want = 1 - math.comb(997, 300) / math.comb(1000, 300)
  assert evaluate.unbiased_pass_at_k(1000, 3, 300) == pytest.approx(want, abs=1e-12)
  with pytest.raises(ValueError, match=re.escape("k=5: must be an integer in [1, 4]")):
    evaluate.unbiased_pass_at_k(4, 1, 5)


def test_pass_and_majority_vote():
  correct = [[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 1]]
  assert evaluate.pass_at_1(correct) == pytest.approx((0.25 + 0 + 0.75) / 3, abs=1e-12)
  # pass@2 per problem: 1 - C(3,2)/C(4,2) = 0.5, 0, 1 - C(1,2)/C(4,2) = 1.
  assert evaluate.pass_at_k(correct, 2) == pytest.approx(0.5, abs=1e-12)
  assert evaluate.majority(["7", "9", "9", "7"]) == 0           # tie: "7" was voted first
  assert evaluate.majority([None, "9", "7", "7", None]) == 2
  assert evaluate.majority([None, None]) is None
  keys = [["5", "4", "4", None], [None, None, None, None], ["8", "8", "3", "8"]]
  assert evaluate.cons_at_k(keys, correct, 4) == pytest.approx(1 / 3, abs=1e-12)  # only the 3rd
  assert evaluate.cons_at_k(keys, correct, 1) == pytest.approx(2 / 3, abs=1e-12)
  assert evaluate.cons_at_k(keys, correct, 2) == pytest.approx(2 / 3, abs=1e-12)  # tie -> "5"
  assert evaluate.format_rate([[1, 1, 1, 0], [0, 0, 0, 0]]) == 3 / 8
  assert evaluate.mean_length([[3, 5], [10, 2]]) == 5.0
  with pytest.raises(ValueError, match=re.escape("correct_PxN.shape=(4,): must be [problems")):
    evaluate.pass_at_1([1, 0, 0, 1])


def test_answers_of_thousands_of_digits_are_compared_as_text():
  p = tasks.Problem("add", (1, 2), 3, "What is 1+2?", "3")
  huge = "9" * 5000  # int() refuses strings over 4,300 digits
  assert not tasks.check_answer(p, huge) and tasks.answer_key(p, huge) == huge
  assert evaluate.answer_kind(p, tasks.completion("", huge)) == "other"


def test_answer_kinds():
  p = tasks.Problem("add", (9, 6, 7, 2), 24, "What is 9+6+7+2?", "24")
  one = tasks.Problem("add", (1, 2, 0, 0), 3, "What is 1+2+0+0?", "3")
  r = lambda a: tasks.completion("t", a)
  texts = [[r("24"), r("42"), r("25"), r("22"), r("52"), r("35"), r("26x"), "24"],
           [r("3"), r("03"), r("5"), r("6"), r("\u00b3")]]  # superscript 3: a digit to str
  want = [["right", "backwards", "near", "near", "near_backwards", "other", "other",
           "unformatted"], ["right", "other", "near", "other", "other"]]  # "03" is not 3
  assert [[evaluate.answer_kind(q, t) for t in row] for q, row in zip((p, one), texts)] == want
  out = evaluate.answer_kinds([p, one], texts)
  assert list(out) == list(evaluate.ANSWER_KINDS)
  assert out == pytest.approx({"right": 2 / 13, "backwards": 1 / 13, "near": 3 / 13,
                               "near_backwards": 1 / 13, "other": 5 / 13,
                               "unformatted": 1 / 13}, abs=1e-12)
  with pytest.raises(ValueError, match="^problems='countdown'"):
    evaluate.answer_kinds([_countdown((2, 4, 6), 22)], [[r("6*4-2")]])


def test_summarize():
  add = tasks.Problem("add", (86, 81), 167, "What is 86+81?", "167")
  cd = _countdown((2, 4, 6), 22)
  r = lambda a: tasks.completion("t", a)
  texts = [[r("168"), r("168"), r("167"), "167"],                  # majority wrong
           [r("6*4-2"), r("4*6-2"), r("24-2"), r("(6*4)-2 ")]]     # two ways to 22 vote together
  out = evaluate.summarize([add, cd], texts, [[4, 4, 4, 1], [9, 9, 8, 10]], ks=(1, 4))
  assert out == pytest.approx({
      "pass@1": (1 / 4 + 3 / 4) / 2, "pass@4": 1.0, "cons@1": 0.5, "cons@4": 0.5,
      "format_rate": 7 / 8, "mean_length": 49 / 8}, abs=1e-12)
