"""FP8 quantization and matmuls against a NumPy + ml_dtypes reference written with block loops."""
import functools
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from moe_jax import fp8
from moe_jax.config import FP8Config

E4M3, E5M2 = ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2
NP_DTYPES = {"e4m3": E4M3, "e5m2": E5M2}
BLOCKS = [(1, 128), (128, 128), None]


# ----------------------------------------------------------------------------------------------
# Reference: one block at a time, Python floats for the scale arithmetic.

def ref_scale(amax, dtype, power_of_two=False):
  fmax = np.float32(ml_dtypes.finfo(dtype).max)
  s = np.float32(1.0) if amax == 0 else max(np.float32(amax) / fmax, np.float32(2.0 ** -126))
  if power_of_two:
    m, e = math.frexp(float(s))
    s = np.float32(2.0 ** (e - 1) if m == 0.5 else 2.0 ** e)
  return np.float32(s)


def ref_cast(block, s, dtype):
  fmax = np.float32(ml_dtypes.finfo(dtype).max)
  return np.clip(block / np.float32(s), -fmax, fmax).astype(dtype)


def ref_blocks(shape, block_shape):
  """Yields (index into the array, index into the scales) for every block."""
  if block_shape is None:
    yield (Ellipsis,), ()
    return
  (M, N), (bm, bn) = shape[-2:], block_shape
  for lead in np.ndindex(*shape[:-2]):
    for i in range(-(-M // bm)):
      for j in range(-(-N // bn)):
        yield lead + (slice(i * bm, (i + 1) * bm), slice(j * bn, (j + 1) * bn)), lead + (i, j)


def ref_scale_shape(shape, block_shape):
  if block_shape is None:
    return ()
  return shape[:-2] + tuple(-(-d // b) for d, b in zip(shape[-2:], block_shape))


def ref_quantize(x, dtype, block_shape, power_of_two=False, scale=None):
  """scale: a fixed per-tensor scale (delayed recipe) instead of the block amax."""
  x = np.asarray(x, np.float32)
  q = np.zeros(x.shape, dtype)
  s_out = np.zeros(ref_scale_shape(x.shape, block_shape), np.float32)
  for xi, si in ref_blocks(x.shape, block_shape):
    block = x[xi]
    s = scale if scale is not None else ref_scale(np.abs(block).max(), dtype, power_of_two)
    q[xi] = ref_cast(block, s, dtype)
    s_out[si] = s
  return q, s_out


def ref_dequantize(q, s, block_shape):
  out = np.zeros(q.shape, np.float32)
  for qi, si in ref_blocks(q.shape, block_shape):
    out[qi] = q[qi].astype(np.float32) * np.float32(s[si])
  return out


def ref_qdq(x, dtype, block_shape, scale=None):
  """Dequantized quantized x, float64, for the matmul references."""
  return ref_dequantize(*ref_quantize(x, dtype, block_shape, scale=scale),
                        block_shape).astype(np.float64)


def assert_bits_equal(q, q_ref):
  np.testing.assert_array_equal(np.asarray(q).view(np.uint8), q_ref.view(np.uint8))


def assert_close(actual, ref, tol=1e-6):
  """Equal up to float32 accumulation: tol relative to each value and to the largest one."""
  actual = np.asarray(actual, np.float64)
  np.testing.assert_allclose(actual, ref, rtol=tol, atol=tol * np.abs(ref).max())


def maybe_jit(fn, jit):
  return jax.jit(fn) if jit else fn


# ----------------------------------------------------------------------------------------------
# quantize / dequantize.

def make_input(kind, rng):
  if kind == "random":
    return rng.standard_normal((256, 256)).astype(np.float32)
  if kind == "zeros":
    return np.zeros((128, 256), np.float32)
  if kind == "zero_block":
    x = rng.standard_normal((256, 256)).astype(np.float32)
    x[:128, 128:] = 0.0
    return x
  if kind == "huge":
    return (1e30 * rng.standard_normal((130, 200))).astype(np.float32)
  if kind == "tiny":
    return (1e-30 * rng.standard_normal((130, 200))).astype(np.float32)
  if kind == "mixed_sign":
    mag = 10.0 ** rng.uniform(-8, 8, (192, 256))
    return (np.sign(rng.standard_normal((192, 256))) * mag).astype(np.float32)
  if kind == "ragged_batched":
    return rng.standard_normal((3, 131, 200)).astype(np.float32)
  if kind == "dispatch_rows":  # [T, D], D not a multiple of 128
    return (rng.standard_normal((40, 200)) * rng.uniform(0.1, 50, (40, 1))).astype(np.float32)
  raise ValueError(kind)


KINDS = ["random", "zeros", "zero_block", "huge", "tiny", "mixed_sign", "ragged_batched",
         "dispatch_rows"]


QUANTIZE_CASES = [(kind, False) for kind in KINDS] + [
    (kind, True) for kind in ("random", "zeros", "huge", "tiny", "mixed_sign")]


@pytest.mark.parametrize("block_shape", BLOCKS)
@pytest.mark.parametrize("dtype", ["e4m3", "e5m2"])
@pytest.mark.parametrize("kind,power_of_two", QUANTIZE_CASES)
def test_quantize_matches_reference(kind, power_of_two, dtype, block_shape):
  x = make_input(kind, np.random.default_rng(0))
  np_dtype = NP_DTYPES[dtype]
  quant = jax.jit(functools.partial(fp8.quantize, dtype=fp8.FP8_DTYPES[dtype],
                                    block_shape=block_shape, power_of_two=power_of_two))
  q, s = quant(x)
  q_ref, s_ref = ref_quantize(x, np_dtype, block_shape, power_of_two)
  assert q.dtype == np_dtype and s.dtype == np.float32
  assert s.shape == s_ref.shape
  assert_bits_equal(q, q_ref)
  np.testing.assert_array_equal(np.asarray(s), s_ref)
  assert np.all(np.isfinite(np.asarray(q, np.float32)))
  if power_of_two:
    mantissa, _ = np.frexp(np.asarray(s))
    np.testing.assert_array_equal(mantissa, 0.5)
  if kind == "zeros":
    np.testing.assert_array_equal(np.asarray(s), 1.0)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("block_shape", BLOCKS)
@pytest.mark.parametrize("dtype", ["e4m3", "e5m2"])
def test_dequantize_round_trip(dtype, block_shape, jit):
  x = make_input("ragged_batched", np.random.default_rng(1)) * 3.0
  fdtype = fp8.FP8_DTYPES[dtype]
  q, s = maybe_jit(functools.partial(fp8.quantize, dtype=fdtype, block_shape=block_shape), jit)(x)
  deq = maybe_jit(functools.partial(fp8.dequantize, block_shape=block_shape), jit)(q, s)
  q_ref, s_ref = ref_quantize(x, NP_DTYPES[dtype], block_shape)
  np.testing.assert_array_equal(np.asarray(deq), ref_dequantize(q_ref, s_ref, block_shape))
  # Rounding error: half a unit in the last place (3 or 2 mantissa bits), or half the smallest
  # subnormal for values below the normal range.
  finfo = ml_dtypes.finfo(NP_DTYPES[dtype])
  s_full = np.broadcast_to(s_ref, x.shape) if block_shape is None else np.asarray(
      fp8.expand(jnp.asarray(s_ref), block_shape, x.shape))
  bound = finfo.eps / 2 * np.abs(x) + float(finfo.smallest_subnormal) / 2 * s_full
  assert np.all(np.abs(np.asarray(deq) - x) <= bound * (1 + 1e-6))
  bf16 = fp8.dequantize(q, s, block_shape=block_shape, out_dtype=jnp.bfloat16)
  assert bf16.dtype == jnp.bfloat16


def test_saturates_never_inf_or_nan():
  # A fixed scale too small for the data (the delayed recipe's case) must clip, not overflow.
  x = jnp.array([[1.0, -1e6, 3e4, 7e4, -2.0]], jnp.float32)
  for dtype in (jnp.float8_e4m3fn, jnp.float8_e5m2):
    q = fp8.quantize_with_scale(x, jnp.float32(1.0), dtype=dtype, block_shape=None)
    fmax = fp8.max_finite(dtype)
    np.testing.assert_array_equal(np.asarray(q, np.float32)[0, [1, 3]], [-fmax, fmax])
    assert np.all(np.isfinite(np.asarray(q, np.float32)))


def test_quantize_bfloat16_input():
  x = jnp.asarray(np.random.default_rng(2).standard_normal((8, 256)), jnp.bfloat16)
  q, s = fp8.quantize(x)
  q_ref, s_ref = ref_quantize(np.asarray(x, np.float32), E4M3, (1, 128))
  assert_bits_equal(q, q_ref)
  np.testing.assert_array_equal(np.asarray(s), s_ref)


def test_tile_scaling_isolates_outlier_tokens():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((1024, 1024)).astype(np.float32)
  outliers = rng.choice(1024, 8, replace=False)
  x[outliers] *= 1e5
  ordinary = np.ones((1024, 1024), bool)
  ordinary[outliers] = False
  err = {bs: float(fp8.quantization_error(jnp.asarray(x), block_shape=bs, where=ordinary))
         for bs in [(1, 128), None]}
  assert err[(1, 128)] * 10 < err[None], err
  assert err[(1, 128)] < 0.05, err


# ----------------------------------------------------------------------------------------------
# fp8_dot / fp8_grouped_dot against dequantize-then-matmul.

def ref_products(x, w, g, cfg, hist=None):
  """(y, dx, dw) of one group from the reference quantizer, float64, per cfg.recipe."""
  fwd, grad, t = NP_DTYPES[cfg.fwd_dtype], NP_DTYPES[cfg.grad_dtype], cfg.tile
  if cfg.recipe == "blockwise":
    qw = ref_qdq(w, fwd, (t, t))
    y = ref_qdq(x, fwd, (1, t)) @ qw
    dx = ref_qdq(g, grad, (1, t)) @ qw.T
    dw = ref_qdq(x.T, fwd, (1, t)) @ ref_qdq(g, grad, (t, 1))
    return y, dx, dw
  if cfg.recipe == "delayed":
    sx, sw, sg = (ref_scale(h.max(), dt) for h, dt in
                  ((hist["x"], fwd), (hist["w"], fwd), (hist["g"], grad)))
  else:
    sx, sw, sg = (ref_scale(np.abs(a).max(), dt) for a, dt in ((x, fwd), (w, fwd), (g, grad)))
  qx, qw, qg = ref_qdq(x, fwd, None, sx), ref_qdq(w, fwd, None, sw), ref_qdq(g, grad, None, sg)
  return qx @ qw, qg @ qw.T, qx.T @ qg


def run_dot(fn, x, w, g, cfg, state, jit):
  """y and the VJP of fn at cotangent g: (y, dx, dw, new_state)."""
  def f(x, w, state):
    return fn(x, w, cfg, state or None)
  def go(x, w, g, state):
    y, vjp = jax.vjp(f, x, w, state)
    return (y,) + vjp(g)
  return maybe_jit(go, jit)(x, w, g, state or {})


def rows_with_spread(rng, shape):
  """Normal values with per-row magnitudes over 3 decades, so the recipes differ."""
  return (rng.standard_normal(shape) * 10.0 ** rng.uniform(-1.5, 1.5, shape[:-1] + (1,))
          ).astype(np.float32)


# Every recipe and grad dtype under jit; op by op (slow to dispatch) with e4m3 gradients and,
# for the grouped form that shares the same core, jit only.
RECIPE_CASES = [(r, gd) for r in ("tensor", "delayed", "blockwise") for gd in ("e4m3", "e5m2")]
DOT_CASES = [(r, gd, True) for r, gd in RECIPE_CASES] + [
    (r, "e4m3", False) for r in ("tensor", "delayed", "blockwise")]


def delayed_histories(rng, groups, length):
  shape = (length,) if groups is None else (groups, length)
  return {k: rng.uniform(0.5, 40, shape).astype(np.float32) for k in ("x", "w", "g")}


@pytest.mark.parametrize("recipe,grad_dtype,jit", DOT_CASES)
def test_fp8_dot_matches_reference(recipe, grad_dtype, jit):
  rng = np.random.default_rng(3)
  cfg = FP8Config(recipe=recipe, grad_dtype=grad_dtype, amax_history_len=4)
  x = rows_with_spread(rng, (2, 100, 300))      # 200 tokens, K=300 not a multiple of 128
  w = (0.05 * rng.standard_normal((300, 136))).astype(np.float32)
  g = rows_with_spread(rng, (2, 100, 136))
  hist = delayed_histories(rng, None, 4) if recipe == "delayed" else None
  y, dx, dw, new_state = run_dot(fp8.fp8_dot, x, w, g, cfg, hist, jit)
  y_ref, dx_ref, dw_ref = ref_products(x.reshape(200, 300), w, g.reshape(200, 136), cfg, hist)
  assert y.shape == (2, 100, 136) and y.dtype == jnp.float32
  assert_close(np.asarray(y).reshape(200, 136), y_ref)
  assert_close(np.asarray(dx).reshape(200, 300), dx_ref)
  assert_close(dw, dw_ref)
  if recipe == "delayed":
    amax = {"x": np.abs(x).max(), "w": np.abs(w).max(), "g": np.abs(g).max()}
    for k in "xwg":
      np.testing.assert_array_equal(np.asarray(new_state[k]),
                                    np.concatenate([[amax[k]], hist[k][:-1]]))
  else:
    assert new_state == {}


GROUPED_CASES = [(r, gd, "e4m3") for r, gd in RECIPE_CASES] + [("blockwise", "e5m2", "e5m2")]


@pytest.mark.parametrize("recipe,grad_dtype,fwd_dtype", GROUPED_CASES)
def test_fp8_grouped_dot_matches_reference(recipe, grad_dtype, fwd_dtype):
  rng = np.random.default_rng(4)
  E, C, K, N = 3, 130, 200, 72
  cfg = FP8Config(recipe=recipe, fwd_dtype=fwd_dtype, grad_dtype=grad_dtype, amax_history_len=3)
  # Experts of very different magnitudes: per-expert scales must not mix them.
  mags = np.array([1e-2, 1.0, 1e2], np.float32)[:, None, None]
  x = rows_with_spread(rng, (E, C, K)) * mags
  w = (0.05 * rng.standard_normal((E, K, N))).astype(np.float32)
  g = rows_with_spread(rng, (E, C, N))
  hist = delayed_histories(rng, E, 3) if recipe == "delayed" else None
  y, dx, dw, new_state = run_dot(fp8.fp8_grouped_dot, x, w, g, cfg, hist, jit=True)
  for e in range(E):
    hist_e = None if hist is None else {k: h[e] for k, h in hist.items()}
    y_ref, dx_ref, dw_ref = ref_products(x[e], w[e], g[e], cfg, hist_e)
    assert_close(y[e], y_ref)
    assert_close(dx[e], dx_ref)
    assert_close(dw[e], dw_ref)
    if recipe == "delayed":
      assert float(new_state["x"][e, 0]) == np.abs(x[e]).max()
      np.testing.assert_array_equal(np.asarray(new_state["g"][e, 1:]), hist["g"][e, :-1])


def test_delayed_scale_uses_previous_history_and_rolls():
  cfg = FP8Config(recipe="delayed", amax_history_len=4)
  x = jnp.array([[1.0, -3.0, 100.0, 0.5]], jnp.float32)  # amax 100, beyond the history's 7
  w = jnp.eye(4, dtype=jnp.float32)
  state = fp8.init_delayed_state(4)
  assert all(h.shape == (4,) and not h.any() for h in state.values())
  state = dict(state, x=jnp.array([3.0, 7.0, 0.0, 0.0]), w=jnp.array([1.75, 0, 0, 0]))
  loss = lambda x, w, s: jnp.sum(fp8.fp8_dot(x, w, cfg, s))
  y = fp8.fp8_dot(x, w, cfg, state)
  # Scales 7/448 = 2^-6 and 1.75/448 = 2^-8 from the histories: 100 saturates to
  # 448 * 2^-6 = 7, the rest are exact in e4m3.
  np.testing.assert_array_equal(np.asarray(y), [[1.0, -3.0, 7.0, 0.5]])
  _, _, new_state = jax.grad(loss, argnums=(0, 1, 2))(x, w, state)
  np.testing.assert_array_equal(np.asarray(new_state["x"]), [100.0, 3.0, 7.0, 0.0])
  np.testing.assert_array_equal(np.asarray(new_state["w"]), [1.0, 1.75, 0.0, 0.0])
  np.testing.assert_array_equal(np.asarray(new_state["g"]), [1.0, 0.0, 0.0, 0.0])
  # Next step: the scale now follows max(history) = 100, so 100 is represented exactly.
  y2 = fp8.fp8_dot(x, w, cfg, new_state)
  assert float(y2[0, 2]) == 100.0
  # The first step's zero history falls back to the current amax (scale 1 would flush small
  # gradients to zero): a gradient of 1e-4 comes through (up to the scale's rounding).
  small = lambda x, w, s: 1e-4 * loss(x, w, s)
  dx0, _, _ = jax.grad(small, argnums=(0, 1, 2))(x, w, fp8.init_delayed_state(4))
  np.testing.assert_allclose(np.asarray(dx0), np.full((1, 4), 1e-4), rtol=1e-6)


def test_recipe_none_is_plain_dot_and_dtype_follows_x():
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((4, 6, 32)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((32, 8)), jnp.float32)
  y = fp8.fp8_dot(x, w, FP8Config(recipe="none"))
  assert y.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(y), np.asarray(x @ w.astype(jnp.bfloat16)))
  for recipe in ("tensor", "blockwise"):
    dot = functools.partial(fp8.fp8_dot, cfg=FP8Config(recipe=recipe))
    def y_and_grads(x, w):
      y, vjp = jax.vjp(dot, x, w)
      return (y,) + vjp(jnp.ones_like(y))
    y8, dx, dw = jax.jit(y_and_grads)(x, w)
    assert y8.dtype == jnp.bfloat16 and dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    y_ref = ref_products(np.asarray(x, np.float32).reshape(24, 32), np.asarray(w),
                         np.ones((24, 8), np.float32), FP8Config(recipe=recipe))[0]
    np.testing.assert_allclose(np.asarray(y8, np.float32).reshape(24, 8), y_ref, rtol=1e-2,
                               atol=1e-2 * np.abs(y_ref).max())


def test_state_is_checked():
  x, w = jnp.ones((2, 4)), jnp.ones((4, 3))
  with pytest.raises(ValueError, match="delayed"):
    fp8.fp8_dot(x, w, FP8Config(recipe="delayed"))
  with pytest.raises(ValueError, match="takes no delayed-scaling state"):
    fp8.fp8_dot(x, w, FP8Config(recipe="tensor"), fp8.init_delayed_state(16))
  with pytest.raises(ValueError, match="expected"):
    fp8.fp8_grouped_dot(x[None], w[None], FP8Config(recipe="delayed", amax_history_len=4),
                        fp8.init_delayed_state(4))
