"""FP8 products: an FP8 matmul with a custom VJP per recipe, its delayed-scaling state, the
model's seam (`Matmuls`) and FP8 dispatch. Quantization itself is quantize.py's (re-exported
here: `fp8.quantize`, `fp8.dequantize`, ...).

Recipes (`FP8Config.recipe`) for `fp8_dot` ([..., M, K] @ [K, N]) and `fp8_grouped_dot`
([E, C, K] @ [E, K, N], one product per expert; every scale below is then per expert):
  "none"       a plain dot in the input dtype, no quantization.
  "tensor"     one current scale per tensor (x, w, and the output gradient g).
  "delayed"    one scale per tensor taken from an amax history (Transformer-Engine style).
  "blockwise"  DeepSeek-V3: x and g in 1 x tile tiles along the contraction dim, w in
               tile x tile blocks; partial sums of each tile-long chunk of the contraction are
               accumulated in float32 and scaled there (the "promotion" V3 does every 128
               elements), so the result is dequantize-then-matmul up to float32 rounding.
The three products of a training step are quantized as follows (x, w in `fwd_dtype`, g in
`grad_dtype`): y = x @ w; dx = g @ w^T (g tiled along N, w's blocks transposed); dw = x^T @ g
(x and g both tiled along the token dim M, the contraction dim there). With leading dims,
`fp8_dot` flattens them into the token dim first.

Delayed-scaling state. The amax of g is only seen in the backward pass, so the histories travel
the way Flax's `OVERWRITE_WITH_GRADIENT` collection does: the state dict
`{"x": hist, "w": hist, "g": hist}` (float32, [L] or [E, L], from `init_delayed_state`) is an
input of the dot, and its *cotangent* is the updated state. The forward quantizes with
`scale = max(history) / max_finite` (the step's own amax is not used, values beyond the history's
range saturate; only an all-zero history, i.e. the first step, takes the current amax); the
cotangent is the history rolled by one with the step's amax at index 0.
A caller keeps the state in its train state (and checkpoints it), differentiates the loss with
respect to it too, and replaces the state with that gradient; it must never reach the optimizer.
Each dot needs its own state: a state shared by two calls (or summed over micro-batches) gets
summed cotangents. A forward-only call (evaluation) leaves the state as it was.

Model seam: `fp8_einsum` runs a dense projection written as an einsum ("btd,dhk->bthk") through
`fp8_dot`, and `Matmuls` bundles a layer's recipe with its per-matrix delayed states, so layers
call `matmuls.einsum(spec, x, "wq", w)` whatever the recipe. The MoE experts (moe/products.py)
run one matrix as several calls and share its state through `share_state`; inside shard_map the
VJPs reduce their cotangents to their primals' mesh variance (`cotangents_like`,
`state_cotangent`).
"""
from __future__ import annotations

import functools
import math
from typing import Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from moe_jax import shard_util
from moe_jax.config import FP8Config
# Quantization is quantize.py's; its functions stay importable here (fp8.quantize, ...).
from moe_jax.quantize import (FP8_DTYPES, block_amax, compute_scale, dequantize,  # noqa: F401
                              expand, max_finite, quantization_error, quantize,
                              quantize_with_scale)

DelayedState = dict[str, jax.Array]


# ----------------------------------------------------------------------------------------------
# Delayed scaling state.

def init_delayed_state(history_len: int, num_groups: Optional[int] = None) -> DelayedState:
  """Zero amax histories for x, w and g: [history_len], or [num_groups, history_len] for
  `fp8_grouped_dot`. Zero history means scale 1 on the first step."""
  shape = (history_len,) if num_groups is None else (num_groups, history_len)
  return {k: jnp.zeros(shape, jnp.float32) for k in ("x", "w", "g")}


def roll_history(history_GxL: jax.Array, amax_G: jax.Array) -> jax.Array:
  """A delayed state's update: the history shifted by one with this step's amax [G] in front."""
  return jnp.concatenate([amax_G[:, None], history_GxL[:, :-1]], axis=1)


# ----------------------------------------------------------------------------------------------
# Products. Everything below works on a leading group dim G (G=1 for a plain dot).

def _dot_f32(a_GxMxC: jax.Array, b_GxCxN: jax.Array) -> jax.Array:
  dims = (((2,), (1,)), ((0,), (0,)))
  return lax.dot_general(a_GxMxC, b_GxCxN, dims, preferred_element_type=jnp.float32)


def _tensor_matmul(qa: jax.Array, qb: jax.Array, sa_G: jax.Array, sb_G: jax.Array) -> jax.Array:
  """Per-tensor scaled product; one float32 accumulation over the whole contraction."""
  return _dot_f32(qa, qb) * (sa_G * sb_G)[:, None, None]


def _chunked_matmul(qa_GxMxC: jax.Array, sa_GxMxCb: jax.Array, qb_GxCxN: jax.Array,
                    sb_GxCbxN: jax.Array, tile: int) -> jax.Array:
  """sum_c (qa[..., c-chunk] @ qb[c-chunk, :]) * sa[:, c] * sb[c, :], float32 throughout.

  Each tile-long chunk of the contraction is its own float32 dot (one batched dot, a ragged
  last chunk zero-padded); the partial sums are scaled and added into a float32 accumulator
  chunk by chunk, in order: the promotion DeepSeek-V3 does on CUDA cores. For XLA:CPU's sake
  the sum is unrolled (one reduce over the chunk axis took YNNPACK 20x the dot's time, in an
  order of its own) and a lone chunk is not padded (dw of a 16-row overflow block would
  multiply 8x the rows). A ragged last chunk after full ones stays padded: as a dot of its own
  it changed the last float32 bit between sharded and single-device layers. Holds Cb partial
  products at once (Cb x the output's memory); a fused kernel is the GPU path.
  """
  G, M, C = qa_GxMxC.shape
  N = qb_GxCxN.shape[2]
  Cb = sa_GxMxCb.shape[2]
  if Cb == 1:
    p_GxCbxMxN = _dot_f32(qa_GxMxC, qb_GxCxN)[:, None]
  else:
    pad = Cb * tile - C
    qa = jnp.pad(qa_GxMxC, ((0, 0), (0, 0), (0, pad))).reshape(G, M, Cb, tile)
    qb = jnp.pad(qb_GxCxN, ((0, 0), (0, pad), (0, 0))).reshape(G, Cb, tile, N)
    dims = (((3,), (2,)), ((0, 2), (0, 1)))
    p_GxCbxMxN = lax.dot_general(qa, qb, dims, preferred_element_type=jnp.float32)
  acc_GxMxN = None
  for c in range(Cb):
    part = p_GxCbxMxN[:, c] * sa_GxMxCb[:, :, c, None] * sb_GxCbxN[:, c, None, :]
    acc_GxMxN = part if acc_GxMxN is None else acc_GxMxN + part
  return jnp.zeros((G, M, N), jnp.float32) if acc_GxMxN is None else acc_GxMxN


def weight_blocks(cfg: FP8Config, w_GxKxN: jax.Array, transpose: bool = False):
  """"blockwise" weights: the FP8 tile x tile blocks of w (of w^T for dx = g @ w^T) and their
  scales repeated along the output dim, ([G, K, N], [G, Kb, N]) or ([G, N, K], [G, Nb, K]).
  Quantizing is deterministic: callers that multiply one weight many times (the MoE's overflow
  blocks) quantize it once and pass the blocks to `forward` / `backward`."""
  t = cfg.tile
  qw, sw = quantize(w_GxKxN, dtype=FP8_DTYPES[cfg.fwd_dtype], block_shape=(t, t),
                    power_of_two=cfg.power_of_two_scale)
  if transpose:
    qw, sw = jnp.swapaxes(qw, 1, 2), jnp.swapaxes(sw, 1, 2)
  return qw, expand(sw, (1, t), sw.shape[:2] + qw.shape[2:])


def tensor_quantize(x_GxMxN: jax.Array, scale_G: jax.Array, dtype) -> jax.Array:
  """x in dtype with one scale per group ([G]): the "tensor" and "delayed" recipes' operands."""
  full = (max(x_GxMxN.shape[1], 1), max(x_GxMxN.shape[2], 1))
  return quantize_with_scale(x_GxMxN, scale_G[:, None, None], dtype=dtype, block_shape=full)


def tensor_amax(x_GxMxN: jax.Array) -> jax.Array:
  """max |x| per group, [G] float32 (0 for a group without elements)."""
  return jnp.max(jnp.abs(x_GxMxN.astype(jnp.float32)), axis=(1, 2), initial=0.0)


def _per_tensor_scales(cfg: FP8Config, x, w, g, state: DelayedState):
  """Scales of x, w and g ([G] each) for the "tensor" and "delayed" recipes."""
  current = [tensor_amax(t) if t is not None else None for t in (x, w, g)]
  return scales_from_amax(cfg, current, state)


def scales_from_amax(cfg: FP8Config, current, state: DelayedState):
  """Scales of x, w and g ([G] each, None where the amax is None) from their current amaxes:
  those themselves ("tensor"), or each state's history ("delayed", current only on step one).
  Kernels that take amaxes their own way (per expert over packed rows) call this directly."""
  fwd, grad = FP8_DTYPES[cfg.fwd_dtype], FP8_DTYPES[cfg.grad_dtype]
  p2 = cfg.power_of_two_scale
  amaxes = current
  if cfg.recipe == "delayed":
    # An all-zero history (the first step) has seen nothing: scale 1 would flush every small
    # gradient to zero, so that step scales by the current amax, as "tensor" does.
    amaxes = []
    for k, now in zip(("x", "w", "g"), current):
      seen = jnp.max(state[k], axis=1)
      amaxes.append(seen if now is None else jnp.where(seen > 0, seen, now))
  return [compute_scale(a, dt, p2) if a is not None else None
          for a, dt in zip(amaxes, (fwd, fwd, grad))]


def forward(cfg: FP8Config, x_GxMxK, w_GxKxN, state: DelayedState, w_blocks=None) -> jax.Array:
  """y = x @ w per the recipe in float32, [G, M, N]; "blockwise" takes w's `weight_blocks` if
  given. The forward of `fp8_dot`; kernels with their own loop call it per step."""
  fwd, t = FP8_DTYPES[cfg.fwd_dtype], cfg.tile
  p2 = cfg.power_of_two_scale
  if cfg.recipe == "blockwise":
    qx, sx = quantize(x_GxMxK, dtype=fwd, block_shape=(1, t), power_of_two=p2)
    qw, sw_GxKbxN = w_blocks if w_blocks is not None else weight_blocks(cfg, w_GxKxN)
    return _chunked_matmul(qx, sx, qw, sw_GxKbxN, t)
  sx, sw, _ = _per_tensor_scales(cfg, x_GxMxK, w_GxKxN, None, state)
  return _tensor_matmul(tensor_quantize(x_GxMxK, sx, fwd), tensor_quantize(w_GxKxN, sw, fwd),
                        sx, sw)


def backward(cfg: FP8Config, x_GxMxK, w_GxKxN, g_GxMxN, state: DelayedState, wT_blocks=None):
  """(dx, dw) in float32 per the recipe, for the output gradient g; "blockwise" takes w's
  transposed `weight_blocks` if given. The backward of `fp8_dot`, without the state update."""
  fwd, grad, t = FP8_DTYPES[cfg.fwd_dtype], FP8_DTYPES[cfg.grad_dtype], cfg.tile
  p2 = cfg.power_of_two_scale
  xT_GxKxM = jnp.swapaxes(x_GxMxK, 1, 2)
  if cfg.recipe == "blockwise":
    # dx = g @ w^T: g tiled along N; w's 128x128 blocks, transposed, serve unchanged.
    qg, sg = quantize(g_GxMxN, dtype=grad, block_shape=(1, t), power_of_two=p2)
    qwT, swT_GxNbxK = (wT_blocks if wT_blocks is not None
                       else weight_blocks(cfg, w_GxKxN, transpose=True))
    dx = _chunked_matmul(qg, sg, qwT, swT_GxNbxK, t)
    # dw = x^T @ g: both tiled along the token dim M, which is the contraction here.
    qxT, sxT = quantize(xT_GxKxM, dtype=fwd, block_shape=(1, t), power_of_two=p2)
    qg2, sg2 = quantize(g_GxMxN, dtype=grad, block_shape=(t, 1), power_of_two=p2)
    dw = _chunked_matmul(qxT, sxT, qg2, sg2, t)
    return dx, dw
  sx, sw, sg = _per_tensor_scales(cfg, x_GxMxK, w_GxKxN, g_GxMxN, state)
  qg = tensor_quantize(g_GxMxN, sg, grad)
  qwT = jnp.swapaxes(tensor_quantize(w_GxKxN, sw, fwd), 1, 2)
  dx = _tensor_matmul(qg, qwT, sg, sw)
  dw = _tensor_matmul(tensor_quantize(xT_GxKxM, sx, fwd), qg, sx, sg)
  return dx, dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fp8_matmul(cfg: FP8Config, x_GxMxK, w_GxKxN, state: DelayedState):
  return forward(cfg, x_GxMxK, w_GxKxN, state).astype(x_GxMxK.dtype)


def _fp8_matmul_fwd(cfg, x_GxMxK, w_GxKxN, state):
  # x and w are kept, not their FP8 forms: dw needs x re-tiled along tokens anyway, and w
  # (a parameter) stays alive regardless. Re-quantizing is deterministic, so it matches.
  y = forward(cfg, x_GxMxK, w_GxKxN, state).astype(x_GxMxK.dtype)
  return y, (x_GxMxK, w_GxKxN, state)


def _fp8_matmul_bwd(cfg, residuals, g_GxMxN):
  x, w, state = residuals
  dx, dw = backward(cfg, x, w, g_GxMxN, state)
  new_state = {}
  if cfg.recipe == "delayed":
    amax = {"x": tensor_amax(x), "w": tensor_amax(w), "g": tensor_amax(g_GxMxN)}
    new_state = {k: roll_history(state[k], amax[k]) for k in state}
  return (*cotangents_like((dx.astype(x.dtype), dw.astype(w.dtype)), (x, w)),
          state_cotangent(new_state, state))


def cotangents_like(cts, primals):
  """Inside shard_map a custom VJP's cotangent must vary over the mesh axes its primal varies
  over: a weight the same on every token shard gets the sum of the shards' partial gradients."""
  return tuple(shard_util.cotangent_like(c, p) for c, p in zip(cts, primals))


def state_cotangent(new_state: DelayedState, state: DelayedState) -> DelayedState:
  """The updated histories, combined over the mesh axes the state is the same on by a max:
  each device's history differs only in the amax at index 0, and the global amax is their max."""
  return {k: shard_util.cotangent_like(h, state[k], jax.lax.pmax) for k, h in new_state.items()}


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def share_state(state: DelayedState, n: int) -> tuple[DelayedState, ...]:
  """n copies of one delayed state, for one logical matmul run as several calls (the expert
  products of each row region). Each call's cotangent is the history rolled with that call's
  amax at index 0 (0 where a group had no rows), so their elementwise max is the history rolled
  with the amax over all calls; a plain shared use would sum them."""
  return (state,) * n


def _share_state_fwd(state, n):
  return (state,) * n, None


def _share_state_bwd(n, _, cts):
  return (jax.tree.map(lambda *c: functools.reduce(jnp.maximum, c), *cts),)


share_state.defvjp(_share_state_fwd, _share_state_bwd)


_fp8_matmul.defvjp(_fp8_matmul_fwd, _fp8_matmul_bwd)


def _check_state(cfg: FP8Config, state: Optional[DelayedState], groups: Optional[int]):
  if cfg.recipe != "delayed":
    if state is not None:
      raise ValueError(f"fp8 recipe={cfg.recipe!r} takes no delayed-scaling state")
    return {}
  if state is None or set(state) != {"x", "w", "g"}:
    raise ValueError("fp8 recipe='delayed' needs state={'x','w','g'} from init_delayed_state")
  want = (cfg.amax_history_len,) if groups is None else (groups, cfg.amax_history_len)
  for k, h in state.items():
    if h.shape != want:
      raise ValueError(f"delayed state[{k!r}].shape={h.shape}: expected {want}")
  return state


def fp8_dot(x: jax.Array, w_KxN: jax.Array, cfg: FP8Config,
            state: Optional[DelayedState] = None) -> jax.Array:
  """x [..., M, K] @ w [K, N] -> [..., M, N] in x's dtype, quantized per `cfg.recipe`.

  "delayed" needs `state` (see the module docstring: its gradient is the updated state);
  the other recipes take none. Leading dims of x are flattened into the token dim.
  """
  K, N = w_KxN.shape
  if x.shape[-1] != K:
    raise ValueError(f"fp8_dot: x.shape={x.shape} does not contract with w.shape={w_KxN.shape}")
  if cfg.recipe == "none":
    _check_state(cfg, state, None)
    return jnp.matmul(x, w_KxN.astype(x.dtype))
  state = _check_state(cfg, state, None)
  state_1xL = {k: h[None] for k, h in state.items()}
  y = _fp8_matmul(cfg, x.reshape(1, -1, K), w_KxN[None], state_1xL)
  return y.reshape(x.shape[:-1] + (N,))


def fp8_grouped_dot(x_ExCxK: jax.Array, w_ExKxN: jax.Array, cfg: FP8Config,
                    state: Optional[DelayedState] = None) -> jax.Array:
  """One product per expert: [E, C, K] @ [E, K, N] -> [E, C, N] in x's dtype.

  Per-tensor scales ("tensor", "delayed") are per expert; "delayed" state is [E, L].
  """
  E, C, K = x_ExCxK.shape
  if w_ExKxN.ndim != 3 or w_ExKxN.shape[:2] != (E, K):
    raise ValueError(f"fp8_grouped_dot: x.shape={x_ExCxK.shape} vs w.shape={w_ExKxN.shape}")
  if cfg.recipe == "none":
    _check_state(cfg, state, E)
    return jnp.einsum("eck,ekn->ecn", x_ExCxK, w_ExKxN.astype(x_ExCxK.dtype))
  return _fp8_matmul(cfg, x_ExCxK, w_ExKxN, _check_state(cfg, state, E))



def fp8_einsum(spec: str, x: jax.Array, w: jax.Array, cfg: FP8Config,
               state: Optional[DelayedState] = None) -> jax.Array:
  """einsum(spec, x, w) of a dense projection, quantized per `cfg.recipe`, in x's dtype.

  w's leading dims contract with x's trailing dims in the same order ("btd,dhk->bthk",
  "bthk,hkd->btd"), so the product is `fp8_dot` of x and w flattened to matrices (one scale
  per tile of the flattened contraction). "none" is the einsum itself, in x's dtype.
  """
  if cfg.recipe == "none":
    _check_state(cfg, state, None)
    return jnp.einsum(spec, x, w.astype(x.dtype))
  inputs, out_spec = spec.replace(" ", "").split("->")
  x_spec, w_spec = inputs.split(",")
  n = sum(c in x_spec for c in w_spec)
  if not 0 < n <= len(x_spec) or x_spec[len(x_spec) - n:] != w_spec[:n] or (
      out_spec != x_spec[:len(x_spec) - n] + w_spec[n:]):
    raise ValueError(f"fp8_einsum: {spec!r} is not x[..., K...] @ w[K..., N...]")
  lead, out = x.shape[:x.ndim - n], w.shape[n:]
  w_KxN = w.reshape(math.prod(w.shape[:n]), math.prod(out))
  return fp8_dot(x.reshape(lead + (w_KxN.shape[0],)), w_KxN, cfg, state).reshape(lead + out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def dispatch_rows(x_RxD: jax.Array, cfg: FP8Config, axis: Optional[str] = None) -> jax.Array:
  """DeepSeek-V3's FP8 dispatch: rows quantized to fwd_dtype in 1 x tile tiles, sent with their
  float32 scales by a tiled all-to-all over mesh axis `axis`, dequantized to x's dtype on
  arrival. axis=None sends nothing: the same rounding where no exchange is written (one
  device; the SPMD layer, whose exchanges the partitioner places). The gradient goes back in
  x's dtype, unrounded (an FP8 cast has no usable VJP)."""
  q, s = quantize(x_RxD, dtype=FP8_DTYPES[cfg.fwd_dtype], block_shape=(1, cfg.tile),
                  power_of_two=cfg.power_of_two_scale)
  q, s = _exchange(q, axis), _exchange(s, axis)
  return dequantize(q, s, block_shape=(1, cfg.tile), out_dtype=x_RxD.dtype)


def _exchange(v, axis):
  return v if axis is None else lax.all_to_all(v, axis, 0, 0, tiled=True)


def _dispatch_rows_fwd(x_RxD, cfg, axis):
  return dispatch_rows(x_RxD, cfg, axis), None


def _dispatch_rows_bwd(cfg, axis, _, dy_RxD):
  # A tiled all-to-all that splits and concatenates the same dim is its own transpose.
  return (_exchange(dy_RxD, axis),)


dispatch_rows.defvjp(_dispatch_rows_fwd, _dispatch_rows_bwd)


class Matmuls(NamedTuple):
  """One layer's dense projections: the recipe and, for "delayed", each matrix's state by
  name (the layer's "fp8" variables). `NO_FP8` multiplies in the compute dtype."""
  cfg: FP8Config
  states: Optional[Mapping[str, DelayedState]] = None

  def _state(self, name: str) -> Optional[DelayedState]:
    return None if self.states is None else self.states[name]

  def dot(self, x: jax.Array, name: str, w_KxN: jax.Array) -> jax.Array:
    return fp8_dot(x, w_KxN, self.cfg, self._state(name))

  def einsum(self, spec: str, x: jax.Array, name: str, w: jax.Array) -> jax.Array:
    return fp8_einsum(spec, x, w, self.cfg, self._state(name))


NO_FP8 = Matmuls(FP8Config())
