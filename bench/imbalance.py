"""Load-imbalance suite: the MoE layer under forced routings, on one device and on a mesh.

The router is forced, not trained: its kernel is [I_E; 0], so a token's router logits are its
first E features, which the suite writes (bias 0). The layer's own group-limited top-k then
selects, so the loads are what the layer really routed (reported as MaxVio). Patterns:
  uniform      token t takes experts tK .. tK+K-1 (mod E): every expert exactly T*K/E rows
  zipf         log(1/rank^s) over a fixed random ranking of experts, plus Gumbel noise
  one_expert   uniform, but every token also takes expert 0 (its logit above the rest)
  one_group    every token's K experts inside group 0 (with expert=n_groups: one device's)
  alternating  one_expert with the hot expert moving between calls, across groups (devices)
For each layer (parallelism "none" on one device; "alltoall" and "gshard" on the mesh) and
capacity factor (dropless, and --capacity_factor) one program is compiled; the patterns are
its inputs, so its memory (memory_analysis, per device) is the same for all of them and the
ratios to uniform compare one executable. Timed: forward + backward, patterns alternating within
each round; a ratio is the median over rounds of that round's time / its uniform time.

Prints one JSON object per line, then a Markdown table on stderr.

    python bench/imbalance.py                       # ~1.5 minutes on the 2-core CPU
    python bench/imbalance.py --tokens=4096 --embed=256 --rounds=5
"""
import argparse
import contextlib
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import moe, sharding
from moe_jax.config import MeshConfig, MoEConfig

PATTERNS = ("uniform", "zipf", "one_expert", "one_group", "alternating")
HOT_LOGIT, ON, OFF = 3.0, 1.0, -1.0


def round_robin(t: int, cfg: MoEConfig, span: int, offset: int = 0) -> np.ndarray:
  """Logits [T, E]: token i prefers experts offset + (iK + j) % span, j < K."""
  logits = np.full((t, cfg.num_experts), OFF, np.float32)
  picks = offset + (np.arange(t)[:, None] * cfg.top_k + np.arange(cfg.top_k)) % span
  np.put_along_axis(logits, picks, ON, axis=1)
  return logits


def logits_for(pattern: str, t: int, cfg: MoEConfig, call: int = 0, zipf_s: float = 1.0,
               seed: int = 0) -> np.ndarray:
  """Router logits [T, E] of a pattern; `call` moves the hot expert of "alternating"."""
  e = cfg.num_experts
  if pattern == "uniform":
    return round_robin(t, cfg, e)
  if pattern == "zipf":
    rng = np.random.default_rng(seed)
    rank = rng.permutation(e) + 1
    return (-zipf_s * np.log(rank) + rng.gumbel(size=(t, e))).astype(np.float32)
  if pattern in ("one_expert", "alternating"):
    logits = round_robin(t, cfg, e)
    hot = hot_expert(call, cfg) if pattern == "alternating" else 0
    logits[:, hot] = HOT_LOGIT
    return logits
  if pattern == "one_group":
    if cfg.top_k > cfg.experts_per_group:
      raise ValueError(f"top_k={cfg.top_k}: pattern one_group needs top_k <= experts per group "
                       f"({cfg.experts_per_group})")
    return round_robin(t, cfg, cfg.experts_per_group)
  raise ValueError(f"pattern={pattern!r}: must be one of {PATTERNS}")


def hot_expert(call: int, cfg: MoEConfig, cycle: int = 4) -> int:
  """The hot expert of the call-th batch of "alternating": `cycle` experts in different groups."""
  return (call % cycle) * cfg.num_experts // cycle


def force_router(params: dict, cfg: MoEConfig) -> dict:
  d, e = cfg.embed_dim, cfg.num_experts
  if d < e:
    raise ValueError(f"embed_dim={d}: the forced router needs embed_dim >= num_experts={e}")
  return {**params, "router": {"kernel": jnp.eye(d, e, dtype=jnp.float32)}}


def forced_input(logits_TxE: np.ndarray, cfg: MoEConfig, seq_len: int, key) -> jax.Array:
  """x [T / seq_len, seq_len, D]: the logits in the first E features, N(0, 1) in the rest."""
  t, e = logits_TxE.shape
  x = jax.random.normal(key, (t, cfg.embed_dim), jnp.float32).at[:, :e].set(logits_TxE)
  return x.reshape(t // seq_len, seq_len, cfg.embed_dim)


def inputs_for(pattern: str, cfg: MoEConfig, tokens: int, seq_len: int, calls: int, zipf_s: float
               ) -> list[jax.Array]:
  """The inputs timed in turn: several only for "alternating" (one per hot expert)."""
  key = jax.random.key(1)
  n = calls if pattern == "alternating" else 1
  return [forced_input(logits_for(pattern, tokens, cfg, call=i, zipf_s=zipf_s), cfg, seq_len,
                       key) for i in range(n)]


def make_step(cfg: MoEConfig, state: dict):
  """Forward + backward (params and x) with the forward's statistics."""
  def loss(p, x):
    y, aux = moe.apply(p, state, x, cfg)
    return y.sum(), aux
  return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))


def place(tree, mesh, names):
  return jax.device_put(tree, sharding.named_sharding(mesh, names)) if mesh else tree


def timed(step, params, xs, repeats: int) -> float:
  """Median seconds of `repeats` calls, cycling through xs (after a warm-up call of each)."""
  for x in xs:
    jax.block_until_ready(step(params, x))
  times = []
  for i in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(step(params, xs[i % len(xs)]))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def run_layer(args, parallelism: str, capacity_factor, mesh) -> list[dict]:
  cfg = MoEConfig(embed_dim=args.embed, num_experts=args.experts, top_k=args.top_k,
                  expert_ffn_dim=args.ffn, num_shared_experts=0, n_groups=args.n_groups,
                  topk_groups=args.topk_groups, capacity_factor=capacity_factor,
                  parallelism=parallelism)
  params, state = moe.init(jax.random.key(0), cfg)
  params = force_router(params, cfg)
  if mesh is not None:
    specs = moe.param_specs(cfg)
    params = {g: {n: place(w, mesh, specs[g][n].axes) for n, w in table.items()}
              for g, table in params.items()}
    state = place(state, mesh, ())
  inputs = {p: [place(x, mesh, ("batch", None, None)) for x in
                inputs_for(p, cfg, args.tokens, args.seq_len, args.calls, args.zipf_s)]
            for p in PATTERNS}
  step = make_step(cfg, state)
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    compiled = step.lower(params, inputs["uniform"][0]).compile()
    memory = compiled.memory_analysis()
    stats = {p: [jax.device_get(step(params, x)[1]) for x in xs] for p, xs in inputs.items()}
    times = {p: [] for p in PATTERNS}
    for _ in range(args.rounds):
      for p in PATTERNS:
        times[p].append(timed(step, params, inputs[p], args.repeats))
  rows = []
  for p in PATTERNS:
    ratios = [a / b for a, b in zip(times[p], times["uniform"])]
    mean = lambda key: float(np.mean([s[key] for s in stats[p]]))
    rows.append({
        "bench": "imbalance", "layer": parallelism, "devices": mesh.size if mesh else 1,
        "capacity_factor": capacity_factor, "pattern": p, "max_vio": round(mean("max_vio"), 3),
        "max_load_share": round(float(np.mean([s["load"].max() / s["load"].sum()
                                               for s in stats[p]])), 4),
        "dropped_fraction": round(mean("dropped_fraction"), 4),
        "time_s": round(statistics.median(times[p]), 4),
        "ratio_to_uniform": round(statistics.median(ratios), 3),
        "round_ratios": [round(r, 3) for r in ratios],
        "temp_bytes": memory.temp_size_in_bytes, "argument_bytes": memory.argument_size_in_bytes,
        "output_bytes": memory.output_size_in_bytes,
        "tokens": args.tokens, "seq_len": args.seq_len, "embed": args.embed, "expert_ffn": args.ffn,
        "experts": args.experts, "top_k": args.top_k, "n_groups": args.n_groups,
        "topk_groups": args.topk_groups, "platform": jax.default_backend(),
        "jax": jax.__version__})
  return rows


def markdown(rows: list[dict]) -> str:
  head = ("layer", "devices", "capacity", "pattern", "MaxVio", "dropped", "time s", "/ uniform",
          "temp MiB", "args MiB", "out MiB")
  mib = lambda n: f"{n / 2**20:.2f}"
  lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
  for r in rows:
    cells = (r["layer"], r["devices"], r["capacity_factor"] or "dropless", r["pattern"],
             r["max_vio"], r["dropped_fraction"], r["time_s"], r["ratio_to_uniform"],
             mib(r["temp_bytes"]), mib(r["argument_bytes"]), mib(r["output_bytes"]))
    lines.append("| " + " | ".join(str(c) for c in cells) + " |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tokens", type=int, default=1024)
  parser.add_argument("--seq_len", type=int, default=128)
  parser.add_argument("--embed", type=int, default=128)
  parser.add_argument("--ffn", type=int, default=64)
  parser.add_argument("--experts", type=int, default=32)
  parser.add_argument("--top_k", type=int, default=4)
  parser.add_argument("--n_groups", type=int, default=8)
  parser.add_argument("--topk_groups", type=int, default=4)
  parser.add_argument("--zipf_s", type=float, default=1.0, help="Zipf exponent")
  parser.add_argument("--capacity_factor", type=float, default=1.25)
  parser.add_argument("--data", type=int, default=1, help="mesh data axis")
  parser.add_argument("--expert", type=int, default=8, help="mesh expert axis")
  parser.add_argument("--calls", type=int, default=4, help="hot experts alternating cycles over")
  parser.add_argument("--layers", default="none,alltoall,gshard")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--rounds", type=int, default=5)
  args = parser.parse_args()
  mesh_cfg = MeshConfig(data=args.data, expert=args.expert)
  jax.config.update("jax_num_cpu_devices", max(mesh_cfg.size, 1))  # before the backend starts
  mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:mesh_cfg.size])
  start, rows = time.perf_counter(), []
  for layer in args.layers.split(","):
    for cf in (None, args.capacity_factor):
      for row in run_layer(args, layer, cf, None if layer == "none" else mesh):
        print(json.dumps(row), flush=True)
        rows.append(row)
  print(markdown(rows), file=sys.stderr)
  print(f"{time.perf_counter() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
  main()
