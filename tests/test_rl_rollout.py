"""Rollouts through the engine: groups share one prefill, log-probs per token, rewards and the
evaluation figures from the completions."""
import jax
import numpy as np

from moe_jax import model
from moe_jax.config import MoEConfig, ModelConfig
from moe_jax.rl import rollout, tasks
from moe_jax.serve import Choice, Completion, Engine, Usage

CFG = ModelConfig(embed_dim=32, num_layers=2, first_k_dense=1, dense_ffn_dim=64, num_heads=4,
                  kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                  max_seq_len=160)
MOE = MoEConfig(embed_dim=32, num_experts=4, top_k=2, expert_ffn_dim=16)
SPEC = tasks.TaskSpec("add", digits=2, count=2)


def test_groups_prefill_each_prompt_once_and_keep_logprobs():
  params, state = model.init(jax.random.key(0), CFG, MOE)
  engine = Engine(params, state, CFG, MOE, num_blocks=96, max_batch=8)
  problems = tasks.problems(SPEC, "train", 3, seed=0)
  groups = rollout.sample_groups(engine, problems, 4, max_tokens=12, temperature=1.0, seed=5)
  assert engine.stats["prompt_tokens_prefilled"] == sum(len(g.prompt_ids) for g in groups)
  for g, p in zip(groups, problems):
    assert g.problem == p and len(g.token_ids) == len(g.logprobs) == len(g.texts) == 4
    assert all(len(t) == len(l) for t, l in zip(g.token_ids, g.logprobs))
    assert all(np.all(np.asarray(l) <= 0) for l in g.logprobs)
    assert g.rewards.shape == (4,)


class Scripted:
  """An engine that answers with fixed texts, to check the evaluation figures."""

  def __init__(self, texts_PxN):
    self.texts = texts_PxN

  def generate(self, requests):
    out = []
    for r, texts in zip(requests, self.texts):
      assert r.n == len(texts) and r.temperature == 0.6 and r.top_p == 0.95
      out.append(Completion([1], [Choice(i, t, [7] * len(t), [0.0] * len(t), "stop")
                                  for i, t in enumerate(texts)], Usage()))
    return out


def test_evaluation_figures_from_the_completions():
  problems = tasks.problems(SPEC, "heldout", 2, seed=0, unique=True)
  right = [tasks.completion("", str(p.target)) for p in problems]
  wrong = [tasks.completion("", str(p.target + 1)) for p in problems]
  texts = [[right[0], right[0], wrong[0], "no format"],  # 2 of 4 right, majority right
           [wrong[1], wrong[1], right[1], right[1]]]     # tie: the answer voted first wins
  out = rollout.evaluate_problems(Scripted(texts), problems, 4, max_tokens=8)
  assert out["pass@1"] == 0.5 and out["pass@4"] == 1.0
  assert out["cons@4"] == 0.5 and out["format_rate"] == 7 / 8
