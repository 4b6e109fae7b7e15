"""moe_jax.moe.apply against the NumPy loop reference, and gradients against a dense rewrite."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moe_reference
from moe_jax import moe
from moe_jax.config import ConfigError, MoEConfig

BACKENDS = ("padded", "ragged")


def make(cfg, shape, seed=0, bias_scale=0.1):
  params, state = moe.init(jax.random.PRNGKey(seed), cfg)
  kb, kx = jax.random.split(jax.random.PRNGKey(seed + 1))
  state = {"router_bias": bias_scale * jax.random.normal(kb, (cfg.num_experts,))}
  x = jax.random.normal(kx, shape + (cfg.embed_dim,))
  return params, state, x


def dense_rewrite(params, state, x, cfg, chosen, kept):
  """Every expert on every token, combined with the reference's routing decisions.

  Shares no dispatch code with the layer, so its autodiff gradients are an independent check.
  """
  x_TxD = x.reshape(-1, cfg.embed_dim)
  logits = x_TxD @ params["router"]["kernel"]
  s = jax.nn.sigmoid(logits) if cfg.score_fn == "sigmoid" else jax.nn.softmax(logits, -1)
  g = jnp.take_along_axis(s, chosen, axis=1)
  if cfg.norm_topk:
    g = g / (g.sum(-1, keepdims=True) + 1e-20)
  g = g * cfg.routed_scaling * kept
  w = params["experts"]
  h = jax.nn.silu(jnp.einsum("td,edf->tef", x_TxD, w["gate"])) * jnp.einsum(
      "td,edf->tef", x_TxD, w["up"])
  y_all = jnp.einsum("tef,efd->ted", h, w["down"])
  y = jnp.einsum("tk,tkd->td", g, jnp.take_along_axis(y_all, chosen[:, :, None], axis=1))
  if "shared" in params:
    y = y + moe.swiglu(x_TxD, params["shared"])
  return y.reshape(x.shape)


CASES = {
    "v3_groups": dict(score_fn="sigmoid", n_groups=4, topk_groups=2, top_k=3,
                      num_shared_experts=1, routed_scaling=2.5),
    "softmax_switch": dict(score_fn="softmax", top_k=1, norm_topk=False, num_shared_experts=0),
    "softmax_mixtral": dict(score_fn="softmax", top_k=2, norm_topk=True, num_shared_experts=0),
    "sigmoid_no_norm_2_shared": dict(score_fn="sigmoid", top_k=4, norm_topk=False,
                                     num_shared_experts=2),
    "capacity": dict(score_fn="sigmoid", top_k=2, capacity_factor=1.0),
}


def check_against_reference(cfg, shape, jit=True, seed=0, bias_scale=0.1, params=None,
                            bias=None):
  p, state, x = make(cfg, shape, seed, bias_scale)
  p = params or p
  if bias is not None:
    state = {"router_bias": jnp.asarray(bias, jnp.float32)}
  fn = lambda p, x: moe.apply(p, state, x, cfg)
  y, aux = (jax.jit(fn) if jit else fn)(p, x)
  y_ref, aux_ref, chosen, kept = moe_reference.apply(
      jax.tree.map(np.asarray, p), np.asarray(state["router_bias"]), np.asarray(x), cfg)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for key, value in aux_ref.items():
    np.testing.assert_allclose(aux[key], value, rtol=1e-5, atol=1e-6, err_msg=key)

  loss = lambda p, x: jnp.sum(jnp.sin(fn(p, x)[0]))
  ref_loss = lambda p, x: jnp.sum(jnp.sin(dense_rewrite(p, state, x, cfg, jnp.asarray(chosen),
                                                        jnp.asarray(kept, jnp.float32))))
  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(p, x)
  ref_grads = jax.grad(ref_loss, argnums=(0, 1))(p, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), grads,
               ref_grads)
  return aux


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference(case, backend):
  cfg = MoEConfig(embed_dim=16, num_experts=8, expert_ffn_dim=12, grouped_backend=backend,
                  **CASES[case])
  aux = check_against_reference(cfg, (3, 7))  # 21 tokens: odd, not a multiple of any block
  if cfg.capacity_factor is None:
    assert float(aux["dropped_fraction"]) == 0.0


# One compile each (~8 s on 2 cores): the edge cases 1, 2 and 8 in the main suite.
@pytest.mark.parametrize("top_k", [1, 2, 8] + [pytest.param(k, marks=pytest.mark.slow)
                                               for k in range(3, 8)])
def test_top_k_1_to_8_group_limited(top_k):
  cfg = MoEConfig(embed_dim=8, num_experts=16, expert_ffn_dim=8, top_k=top_k, n_groups=4,
                  topk_groups=2, num_shared_experts=1, grouped_backend="padded")
  check_against_reference(cfg, (2, 5), seed=top_k)


def test_many_rows_per_expert_uses_larger_blocks():
  cfg = MoEConfig(embed_dim=8, num_experts=4, expert_ffn_dim=8, top_k=2, num_shared_experts=0,
                  grouped_backend="padded")
  check_against_reference(cfg, (601,))


def test_without_jit():
  cfg = MoEConfig(embed_dim=8, num_experts=8, expert_ffn_dim=8, top_k=2, n_groups=2,
                  topk_groups=1)
  check_against_reference(cfg, (9,), jit=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_skewed_router_dropless_drops_nothing(backend):
  cfg = MoEConfig(embed_dim=8, num_experts=8, expert_ffn_dim=8, top_k=2,
                  grouped_backend=backend)
  # Expert 0 and 1 win for every token: the worst case for any static bucket size.
  aux = check_against_reference(cfg, (33,), bias=[10.0, 10.0] + [0.0] * 6)
  assert float(aux["dropped_fraction"]) == 0.0
  assert float(aux["load"][0]) == 33 and float(aux["max_vio"]) == pytest.approx(3.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_capacity_counts_its_drops(backend):
  cfg = MoEConfig(embed_dim=8, num_experts=8, expert_ffn_dim=8, top_k=2, capacity_factor=1.0,
                  grouped_backend=backend)
  aux = check_against_reference(cfg, (40,), bias=[10.0] + [0.0] * 7)
  # Capacity is 10 rows per expert and all 40 tokens want expert 0: 30 of 80 assignments drop.
  assert float(aux["dropped_fraction"]) == pytest.approx(30 / 80)


def test_bfloat16_compute_is_close_and_router_stays_float32():
  cfg = MoEConfig(embed_dim=16, num_experts=8, expert_ffn_dim=16, top_k=2, dtype="bfloat16")
  p, state, x = make(cfg, (4, 8))
  assert p["router"]["kernel"].dtype == jnp.float32
  assert state["router_bias"].dtype == jnp.float32
  y, _ = jax.jit(lambda p, x: moe.apply(p, state, x, cfg))(p, x)
  y32, _ = moe.apply(p, state, x, dataclasses.replace(cfg, dtype="float32"))
  assert y.dtype == x.dtype
  np.testing.assert_allclose(y, y32, rtol=0.05, atol=0.05)


def test_param_layout():
  cfg = MoEConfig(embed_dim=6, num_experts=5, expert_ffn_dim=3, top_k=2, num_shared_experts=2)
  params, state = moe.init(jax.random.PRNGKey(0), cfg)
  shapes = jax.tree.map(lambda a: a.shape, params)
  assert shapes == {"router": {"kernel": (6, 5)},
                    "experts": {"gate": (5, 6, 3), "up": (5, 6, 3), "down": (5, 3, 6)},
                    "shared": {"gate": (6, 6), "up": (6, 6), "down": (6, 6)}}
  assert state["router_bias"].shape == (5,) and not np.any(state["router_bias"])
  no_shared, _ = moe.init(jax.random.PRNGKey(0), dataclasses.replace(cfg, num_shared_experts=0))
  assert "shared" not in no_shared


def test_update_bias_rule():
  cfg = MoEConfig(num_experts=4, top_k=1, bias_update_rate=0.01)
  state = {"router_bias": jnp.zeros(4)}
  new = moe.update_bias(state, jnp.array([4.0, 1.0, 2.0, 1.0]), cfg)
  np.testing.assert_allclose(new["router_bias"], [-0.01, 0.01, 0.0, 0.01])


def test_update_bias_balances_a_skewed_router():
  cfg = MoEConfig(embed_dim=16, num_experts=16, expert_ffn_dim=8, top_k=2,
                  bias_update_rate=0.01, num_shared_experts=0)
  params, state = moe.init(jax.random.PRNGKey(0), cfg)
  direction = jax.random.normal(jax.random.PRNGKey(1), (16,))
  # A fixed router that prefers the first experts for tokens near a common direction.
  params["router"]["kernel"] = params["router"]["kernel"].at[:, :3].add(0.3 * direction[:, None])

  @jax.jit
  def step(state, key):
    x = jax.random.normal(key, (256, 16)) + direction[None, :]
    _, aux = moe.apply(params, state, x, cfg)
    return moe.update_bias(state, aux["load"], cfg), aux["max_vio"]

  vios = []
  for key in jax.random.split(jax.random.PRNGKey(2), 200):
    state, vio = step(state, key)
    vios.append(float(vio))
  first, last = np.mean(vios[:5]), np.mean(vios[-20:])
  assert first > 5 * last, (first, last)


@pytest.mark.parametrize("field,value,message", [
    ("top_k", 9, "top_k=9: must be <= num_experts=8"),
    ("n_groups", 3, "n_groups=3: must divide num_experts=8"),
    ("score_fn", "relu", "score_fn='relu': must be one of 'sigmoid', 'softmax'"),
    ("embed_dim", 0, "embed_dim=0: must be a positive integer"),
    ("capacity_factor", -1.0, "capacity_factor=-1.0: must be None (dropless) or a number > 0"),
    ("grouped_backend", "dense", "grouped_backend='dense'"),
])
def test_config_errors_name_the_field(field, value, message):
  with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
    MoEConfig(**{field: value})


def test_config_group_constraints():
  with pytest.raises(ConfigError, match="topk_groups=3: must be <= n_groups=2"):
    MoEConfig(num_experts=8, n_groups=2, topk_groups=3)
  with pytest.raises(ConfigError, match="top_k=5: must be <= topk_groups"):
    MoEConfig(num_experts=8, n_groups=4, topk_groups=2, top_k=5)


def test_wrong_embed_dim_is_one_clear_error():
  cfg = MoEConfig(embed_dim=8)
  params, state = moe.init(jax.random.PRNGKey(0), cfg)
  with pytest.raises(ValueError, match=r"x.shape=\(3, 5\): last dimension must equal"):
    moe.apply(params, state, jnp.zeros((3, 5)), cfg)


@pytest.mark.parametrize("skew", [0.0, 0.3, 10.0])
def test_buckets_overflow_and_spill(skew):
  """Enough tokens for the batched bucket region; skew pushes rows into overflow blocks and,
  at 10, past the overflow buffer into the second pass (everything wants expert 0)."""
  cfg = MoEConfig(embed_dim=8, num_experts=4, expert_ffn_dim=8, top_k=1, num_shared_experts=0,
                  grouped_backend="padded")
  aux = check_against_reference(cfg, (2, 200), bias=[skew, 0.0, 0.0, 0.0])
  assert float(aux["dropped_fraction"]) == 0.0


def test_routed_and_shared_experts_start_at_the_intended_scale():
  """Every matrix starts at variance 1 / its contraction dim (D for router, gate and up, F for a
  routed expert's down): the expert axis is no fan-in, so a routed expert's output starts at a
  shared expert's scale. The model's MoE blocks start at its init_std, routed and shared alike."""
  from moe_jax import model
  from moe_jax.config import ModelConfig
  d, e, f = 256, 64, 128
  cfg = MoEConfig(embed_dim=d, num_experts=e, top_k=2, expert_ffn_dim=f, num_shared_experts=1)
  params, _ = moe.init(jax.random.PRNGKey(0), cfg)
  std = lambda w: float(np.std(np.asarray(w)))
  for group in ("experts", "shared"):
    np.testing.assert_allclose(std(params[group]["gate"]), d ** -0.5, rtol=0.02)
    np.testing.assert_allclose(std(params[group]["up"]), d ** -0.5, rtol=0.02)
    np.testing.assert_allclose(std(params[group]["down"]), f ** -0.5, rtol=0.02)
  np.testing.assert_allclose(std(params["router"]["kernel"]), d ** -0.5, rtol=0.02)
  x_TxD = jax.random.normal(jax.random.PRNGKey(1), (1024, d))
  shared = std(moe.swiglu(x_TxD, params["shared"]))
  routed = [std(moe.swiglu(x_TxD, {k: w[i] for k, w in params["experts"].items()}))
            for i in range(8)]
  np.testing.assert_allclose(np.mean(routed), shared, rtol=0.15)

  mcfg = ModelConfig(embed_dim=64, num_layers=2, first_k_dense=1,
                     dense_ffn_dim=64, max_seq_len=16)
  small = MoEConfig(embed_dim=64, num_experts=8, top_k=2, expert_ffn_dim=32,
                    num_shared_experts=1)
  ffn = model.init(jax.random.key(0), mcfg, small)[0]["layer_1"]["ffn"]
  for group in ("experts", "shared"):
    for name in ("gate", "up", "down"):
      np.testing.assert_allclose(std(ffn[group][name]), mcfg.init_std, rtol=0.05)
  np.testing.assert_allclose(std(ffn["router"]["kernel"]), mcfg.init_std, rtol=0.05)
