"""Groups to the learner's batch (alignment, masks, routes, advantages) and dynamic sampling, on
hand-built groups; and the alignment against the learner's own log-probs through a real engine."""
import jax
import numpy as np
import pytest

from moe_jax import model
from moe_jax.config import ExperimentConfig, ModelConfig, MoEConfig, TrainConfig
from moe_jax.rl import batch as rl_batch
from moe_jax.rl import learner, tasks
from moe_jax.rl.config import RLConfig
from moe_jax.rl.rollout import Group, sample_groups
from moe_jax.serve import Engine

PROBLEM = tasks.problems(tasks.TaskSpec(), "train", 1, seed=0)[0]


def group(prompt, completions, rewards, routes=False):
  logps = [[-0.1 * (j + 1) for j in range(len(c))] for c in completions]
  r = None
  if routes:  # layer 1 of K=2: expert = the token id mod 4, the last position never fed
    r = [np.array([[[t % 4, 3]] for t in prompt + c[:-1]] + [[[-1, -1]]], np.int32)
         for c in completions]
  return Group(PROBLEM, prompt, completions, logps, ["x"] * len(completions),
               np.asarray(rewards, np.float64), r)


def test_tokens_mask_logprobs_and_routes_are_aligned():
  g = group([1, 2, 3], [[10, 11], [12, 13, 14]], [1.0, 0.0], routes=True)
  out = rl_batch.make_batch([g], RLConfig(), 8, pad_id=258)
  np.testing.assert_array_equal(out["tokens"], [[1, 2, 3, 10, 11, 258, 258, 258],
                                                [1, 2, 3, 12, 13, 14, 258, 258]])
  np.testing.assert_array_equal(out["mask"], [[0, 0, 0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1, 0, 0]])
  np.testing.assert_allclose(out["behaviour_logp"][1], [0, 0, 0, -0.1, -0.2, -0.3, 0, 0])
  assert out["routes"].shape == (2, 8, 1, 2)
  np.testing.assert_array_equal(out["routes"][0, :, 0, 0], [1, 2, 3, 2, -1, -1, -1, -1])
  np.testing.assert_allclose(out["advantages"], [1.0, -1.0], atol=1e-5)


def test_advantages_unscaled_and_uniform_groups_zero():
  groups = [group([1], [[5], [6], [7]], [1.0, 0.0, 0.0]), group([2], [[5], [6], [7]], [1, 1, 1])]
  out = rl_batch.make_batch(groups, RLConfig(scale_advantages=False, router_replay=False), 4)
  np.testing.assert_allclose(out["advantages"], [2 / 3, -1 / 3, -1 / 3, 0, 0, 0], atol=1e-6)
  assert "routes" not in out


def test_bad_inputs_fail_with_one_line():
  g = group([1, 2, 3], [[10, 11]] * 2, [1.0, 0.0])
  with pytest.raises(ValueError,
                     match=r"seq_len=4: must be >= prompt \+ completion \(\+ its EOS\) = 5"):
    rl_batch.make_batch([g], RLConfig(router_replay=False), 4)
  with pytest.raises(ValueError, match=r"rl.router_replay=True: needs the engine's routes"):
    rl_batch.make_batch([g], RLConfig(), 8)


def test_dynamic_sampling_replaces_uniform_groups_with_fresh_prompts():
  rewards = iter([[1, 1], [0, 1], [0, 0], [1, 0], [1, 1], [0, 1]])
  calls = []

  def draw(n):
    calls.append(n)
    return [group([i], [[5], [6]], next(rewards)) for i in range(n)]

  kept, stats = rl_batch.fill_groups(draw, 3, drop_uniform=True)
  assert calls == [3, 2, 1] and [list(g.rewards) for g in kept] == [[0, 1], [1, 0], [0, 1]]
  assert stats == {"groups_drawn": 6, "uniform_fraction": 0.5, "draws": 3}
  rewards = iter([[1, 1]] * 8)
  kept, stats = rl_batch.fill_groups(draw, 2, drop_uniform=True, max_draws=2)
  assert len(kept) == 2 and stats["draws"] == 2  # capped: the uniform groups fill the batch
  rewards = iter([[1, 1], [0, 1]])
  kept, stats = rl_batch.fill_groups(draw, 2, drop_uniform=False)
  assert stats["draws"] == 1 and stats["uniform_fraction"] == 0.5


MODEL = ModelConfig(embed_dim=32, num_layers=2, first_k_dense=1, dense_ffn_dim=64, num_heads=4,
                    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                    max_seq_len=96)
MOE = MoEConfig(embed_dim=32, num_experts=4, top_k=2, expert_ffn_dim=16)


def test_batch_logprobs_equal_the_learners_with_replay():
  params, state = model.init(jax.random.key(0), MODEL, MOE)
  engine = Engine(params, state, MODEL, MOE, num_blocks=96, max_batch=8, record_routes=True)
  groups = sample_groups(engine, tasks.problems(tasks.TaskSpec(), "train", 2, seed=0), 2,
                         max_tokens=10, temperature=1.0, seed=3)
  b = rl_batch.make_batch(groups, RLConfig(), 96, pad_id=258)
  cfg = ExperimentConfig(model=MODEL, moe=MOE, train=TrainConfig(seq_len=96))
  logp, _, _ = learner.logprobs(params, state, b["tokens"], cfg, routes=b["routes"])
  gap = np.abs(np.asarray(logp) - b["behaviour_logp"]) * b["mask"]
  assert b["mask"].sum() > 0 and gap.max() < 1e-5
