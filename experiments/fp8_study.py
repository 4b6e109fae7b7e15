"""experiment="fp8_study": does FP8 training of the dense projections and experts track bfloat16?

Per seed (config `seeds`, default [train.seed]), five runs of the real trainer (`train.train`),
same seed and batches, in <workdir>/runs/seed<s>/<name>:
  float32    float32 compute, no FP8    } their difference is the noise floor: what a change of
  bfloat16   bfloat16 compute, no FP8   } rounding alone does to the loss of the same run
  tensor     bfloat16 compute, dense projections and experts in FP8, one current scale per tensor
  delayed    ... one scale per tensor from an amax history (Transformer-Engine style)
  blockwise  ... DeepSeek-V3: 1 x tile activation tiles, tile x tile weight blocks
The config's model/moe dtype and fp8.recipe are set per run; the rest of its fp8 section (FP8
types, tile, history length) applies to all. What FP8 covers is model.py's docstring (every dense
projection and every routed and shared expert matmul). A rerun in the same workdir skips
finished runs (they resume at their last checkpoint) and refuses a workdir whose runs used
another config.

Headline: the final relative loss difference of each run to bfloat16 of the same seed,
(L - L_bf16) / L_bf16, on the held-out loss at the last step (same evaluation batches for all
runs) and on the train loss averaged over the last tenth of the steps; its mean over the seeds
with the standard error of that mean; next to the noise floor, the mean over the seeds of
|L_f32 - L_bf16| / L_bf16. Why several seeds: the tiny MoE's training is chaotic (a rounding
change flips top-k routing choices and the sign-based bias updates, and the runs decorrelate),
so one seed's difference scatters by about 1% whatever the numerics; the criterion is judged on
the mean. Beside it, free of that chaos: each seed's final bfloat16 weights evaluated under each
recipe (`same_weights_rows`), the loss a recipe's rounding costs the forward pass.

Quantization error (no training): fp8.quantization_error of activations [tokens, channels] with
N(0, 1) entries where a few whole tokens (rows) or channels (columns) are scaled by 1 .. 1e5,
per recipe: "tensor" (current per-tensor scale), "delayed" (per-tensor scale from the history of
the same tensor without outliers: the outliers arrive unannounced) and "blockwise" (1 x tile).
It reports the error of the ordinary entries (is the rest crushed by the outliers' scale?) and of
the outliers (do they saturate?).

Outputs in the workdir: fp8_study.md, fp8_study.csv (one row per seed and run),
fp8_study_mean.csv (one row per run: means over the seeds), fp8_same_weights.csv (the bfloat16
weights evaluated under each recipe), fp8_quantization.csv, fp8_study.png
(loss curves of the first seed, difference to bfloat16 over steps averaged over the seeds,
quantization error).
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from experiments import report
# The runs' machinery is shared with the other studies; these names stay the study's API.
from experiments.study_runs import WALL_FILE, train_run  # noqa: F401
from experiments.study_runs import check_run_dir as _check_run_dir  # noqa: F401
from experiments.study_runs import mean_se as _mean_se
from moe_jax import fp8, train
from moe_jax.config import ExperimentConfig, FP8Config

RUNS = {"float32": ("float32", "none"), "bfloat16": ("bfloat16", "none"),
        "tensor": ("bfloat16", "tensor"), "delayed": ("bfloat16", "delayed"),
        "blockwise": ("bfloat16", "blockwise")}
BASELINE, FLOOR = "bfloat16", "float32"
# Acceptance (the FP8 issue): blockwise within 0.5% of bfloat16 and at most twice the floor.
MAX_REL_DIFF, MAX_FLOOR_MULTIPLE = 0.005, 2.0
MAGNITUDES = (1.0, 1e1, 1e2, 3e2, 1e3, 3e3, 1e4, 3e4, 1e5)
QUANT_RECIPES = ("tensor", "delayed", "blockwise")
RUN_COLUMNS = ("seed", "run", "compute", "recipe", "steps", "final_train_loss",
               "train_rel_diff", "final_eval_loss", "eval_rel_diff", "s_per_step", "wall_s")
MEAN_COLUMNS = ("run", "compute", "recipe", "seeds", "final_train_loss", "train_rel_diff",
                "train_rel_diff_se", "abs_train_rel_diff", "final_eval_loss", "eval_rel_diff",
                "eval_rel_diff_se", "abs_eval_rel_diff", "s_per_step", "wall_s")
SAME_COLUMNS = ("seed", "run", "recipe", "step", "eval_loss", "rel_diff")
QUANT_COLUMNS = ("outliers", "magnitude", "recipe", "err_ordinary", "err_outliers")


def study_seeds(cfg: ExperimentConfig) -> tuple[int, ...]:
  return cfg.seeds or (cfg.train.seed,)


def run_config(cfg: ExperimentConfig, name: str, seed: int) -> ExperimentConfig:
  dtype, recipe = RUNS[name]
  return dataclasses.replace(
      cfg, experiment="train", seeds=(), model=dataclasses.replace(cfg.model, dtype=dtype),
      moe=dataclasses.replace(cfg.moe, dtype=dtype),
      fp8=dataclasses.replace(cfg.fp8, recipe=recipe),
      train=dataclasses.replace(cfg.train, seed=seed))


def run_dir(workdir: str, seed: int, name: str) -> str:
  return os.path.join(workdir, "runs", f"seed{seed}", name)


def _rel(value: float, base: float) -> float:
  return (value - base) / base


def summarize(results: dict[str, dict], steps: int, seed: int) -> list[dict]:
  """One row per run of one seed, its differences to that seed's bfloat16 run."""
  base = results[BASELINE]
  rows = []
  for name, r in results.items():
    rows.append({"seed": seed, "run": name, "compute": RUNS[name][0], "recipe": RUNS[name][1],
                 "steps": steps,
                 "final_train_loss": r["final_train_loss"],
                 "train_rel_diff": _rel(r["final_train_loss"], base["final_train_loss"]),
                 "final_eval_loss": r["final_eval_loss"],
                 "eval_rel_diff": _rel(r["final_eval_loss"], base["final_eval_loss"]),
                 "s_per_step": r["s_per_step"], "wall_s": r["wall_s"]})
  return rows


def aggregate(rows: list[dict]) -> list[dict]:
  """One row per run: its figures averaged over the seeds; the differences to bfloat16 (paired
  per seed) with their standard errors, and the floor's `abs_eval_rel_diff` etc. (mean of
  |difference|: the float32 run's size of difference, whatever its sign)."""
  out = []
  for name in RUNS:
    mine = [r for r in rows if r["run"] == name]
    if not mine:
      continue
    row = {"run": name, "compute": RUNS[name][0], "recipe": RUNS[name][1],
           "seeds": len(mine)}
    for key in ("final_train_loss", "final_eval_loss", "s_per_step", "wall_s"):
      row[key] = float(np.mean([r[key] for r in mine]))
    for key in ("train_rel_diff", "eval_rel_diff"):
      row[key], row[key + "_se"] = _mean_se([r[key] for r in mine])
      row["abs_" + key] = float(np.mean([abs(r[key]) for r in mine]))
    out.append(row)
  return out


def verdict(means: list[dict], key: str = "eval_rel_diff") -> tuple[bool, float, float]:
  """(met, |blockwise mean diff|, noise floor) of the acceptance criterion on `key`, from the
  rows of `aggregate`: the floor is the float32 runs' mean |difference| to bfloat16."""
  by_run = {r["run"]: r for r in means}
  diff, floor = abs(by_run["blockwise"][key]), by_run[FLOOR]["abs_" + key]
  met = diff < MAX_REL_DIFF and diff <= MAX_FLOOR_MULTIPLE * floor
  return bool(met), diff, floor


# ----------------------------------------------------------------------------- same weights

SAME_WEIGHTS_RUNS = ("float32", "bfloat16", "tensor", "blockwise")


def same_weights_rows(config: ExperimentConfig, workdir: str) -> list[dict]:
  """Held-out loss of each seed's final bfloat16 weights under each run's numerics: what a
  recipe's rounding costs the forward pass, free of the chaos of training. "delayed" is left
  out: its scales come from amax histories that the bfloat16 run never kept."""
  seeds = study_seeds(config)
  # One setup (and one compiled evaluation) per recipe for all seeds: the held-out batches do
  # not depend on train.seed.
  setups = {name: train.Setup(run_config(config, name, seeds[0])) for name in SAME_WEIGHTS_RUNS}
  rows = []
  for seed in seeds:
    _, state, step = train.load_state(run_config(config, BASELINE, seed),
                                      run_dir(workdir, seed, BASELINE))
    weights = {"params": state["params"], "moe_state": state["moe_state"]}
    losses = {name: setup.evaluate(weights)["eval_loss"] for name, setup in setups.items()}
    rows += [{"seed": seed, "run": name, "recipe": RUNS[name][1], "step": step,
              "eval_loss": losses[name], "rel_diff": _rel(losses[name], losses[BASELINE])}
             for name in SAME_WEIGHTS_RUNS]
  return rows


# ----------------------------------------------------------------------------- quantization


def outlier_activations(kind: str, magnitude: float, *, tokens: int = 512, channels: int = 512,
                        count: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(x [tokens, channels] float32, outlier mask): N(0, 1) with `count` whole tokens (rows) or
  channels (columns) scaled by `magnitude`."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((tokens, channels)).astype(np.float32)
  mask = np.zeros_like(x, bool)
  if kind == "token":
    mask[rng.choice(tokens, count, replace=False)] = True
  elif kind == "channel":
    mask[:, rng.choice(channels, count, replace=False)] = True
  else:
    raise ValueError(f"outlier kind {kind!r}: 'token' or 'channel'")
  return np.where(mask, x * np.float32(magnitude), x), mask


def _delayed_error(x: jax.Array, seen_amax: jax.Array, cfg: FP8Config,
                   where: jax.Array) -> jax.Array:
  """Per-tensor quantization error with the scale of an amax seen before (the history)."""
  dtype = fp8.FP8_DTYPES[cfg.fwd_dtype]
  scale = fp8.compute_scale(seen_amax, dtype, cfg.power_of_two_scale)
  q = fp8.quantize_with_scale(x, scale, dtype=dtype, block_shape=None)
  err = jnp.where(where, fp8.dequantize(q, scale, block_shape=None) - x, 0.0)
  return jnp.linalg.norm(err) / jnp.linalg.norm(jnp.where(where, x, 0.0))


def quantization_rows(cfg: FP8Config, magnitudes=MAGNITUDES) -> list[dict]:
  dtype = fp8.FP8_DTYPES[cfg.fwd_dtype]
  blocks = {"tensor": None, "blockwise": (1, cfg.tile)}
  rows = []
  for kind in ("token", "channel"):
    clean, _ = outlier_activations(kind, 1.0)
    for magnitude in magnitudes:
      x, mask = outlier_activations(kind, magnitude)
      x, mask = jnp.asarray(x), jnp.asarray(mask)
      for recipe in QUANT_RECIPES:
        errs = []
        for where in (~mask, mask):
          if recipe == "delayed":
            errs.append(_delayed_error(x, jnp.max(jnp.abs(clean)), cfg, where))
          else:
            errs.append(fp8.quantization_error(x, block_shape=blocks[recipe], dtype=dtype,
                                               power_of_two=cfg.power_of_two_scale,
                                               where=where))
        rows.append({"outliers": kind, "magnitude": magnitude, "recipe": recipe,
                     "err_ordinary": float(errs[0]), "err_outliers": float(errs[1])})
  return rows


def absorbed_up_to(rows: list[dict], kind: str, recipe: str) -> Optional[float]:
  """The largest magnitude before the ordinary entries' error first exceeds twice its value
  without outliers (magnitude 1); None if it never does."""
  mine = sorted((r for r in rows if r["outliers"] == kind and r["recipe"] == recipe),
                key=lambda r: r["magnitude"])
  ref, last = mine[0]["err_ordinary"], mine[0]["magnitude"]
  for r in mine[1:]:
    if r["err_ordinary"] > 2 * ref:
      return last
    last = r["magnitude"]
  return None


# ----------------------------------------------------------------------------- outputs


def _fmt(value, spec: str) -> str:
  return "n/a" if value is None or not np.isfinite(value) else format(value, spec)


def _pct(value, spec: str = "+.3f") -> str:
  return f"{_fmt(100 * value, spec)}%" if value is not None and np.isfinite(value) else "n/a"


def markdown(cfg: ExperimentConfig, rows: list[dict], means: list[dict], same: list[dict],
             qrows: list[dict], wall_s: float) -> str:
  t, seeds = cfg.train, study_seeds(cfg)
  out = [f"# FP8 study: {t.steps} steps, batch {t.batch_size} x {t.seq_len}, "
         f"seeds {', '.join(map(str, seeds))}, data {cfg.data.source}",
         "", f"FP8: {cfg.fp8.fwd_dtype} activations/weights, {cfg.fp8.grad_dtype} gradients, "
         f"tile {cfg.fp8.tile}, amax history {cfg.fp8.amax_history_len}. In FP8: the dense "
         "projections (attention, dense FFN, MTP projection) and the routed and shared experts; "
         "router, embeddings, head, norms and softmax stay in bfloat16/float32.", "",
         f"## Mean over {len(seeds)} seed(s)", "",
         "Differences to the bfloat16 run of the same seed, averaged over the seeds, +- the "
         "standard error of that mean.", ""]
  losses = ("train loss", "vs bf16", "held-out loss", "vs bf16", "s/step", "run min")
  diff = lambda r, k: f"{_pct(r[k])} +- {_pct(r[k + '_se'], '.3f')}"
  out += report.table(("run", "compute", "FP8 recipe") + losses, [
      (r["run"], r["compute"], r["recipe"], _fmt(r["final_train_loss"], ".4f"),
       diff(r, "train_rel_diff"), _fmt(r["final_eval_loss"], ".4f"), diff(r, "eval_rel_diff"),
       _fmt(r["s_per_step"], ".2f"), _fmt(r["wall_s"] / 60, ".1f")) for r in means])
  out.append("")
  for key, what in (("eval_rel_diff", "held-out"), ("train_rel_diff", "train")):
    met, diff, floor = verdict(means, key)
    out.append(f"- {what} loss: noise floor mean |float32 - bfloat16| = {_pct(floor, '.3f')}; "
               f"blockwise |mean| {_pct(diff, '.3f')} -> criterion (< {100 * MAX_REL_DIFF:.1f}% "
               f"and <= {MAX_FLOOR_MULTIPLE:g}x floor) {'MET' if met else 'NOT met'}")
  out += ["", "## Per seed", ""]
  out += report.table(("seed", "run", "FP8 recipe") + losses, [
      (r["seed"], r["run"], r["recipe"], _fmt(r["final_train_loss"], ".4f"),
       _pct(r["train_rel_diff"]), _fmt(r["final_eval_loss"], ".4f"), _pct(r["eval_rel_diff"]),
       _fmt(r["s_per_step"], ".2f"), _fmt(r["wall_s"] / 60, ".1f")) for r in rows])
  out += ["", "## Same weights: the forward cost of each recipe", "",
          "Held-out loss of each seed's final bfloat16 weights evaluated under each run's "
          "numerics (no training, so no chaos), relative to evaluating them in bfloat16.", ""]
  cells = []
  for name in SAME_WEIGHTS_RUNS:
    mine = [r for r in same if r["run"] == name]
    if mine:
      mean, se = _mean_se([r["rel_diff"] for r in mine])
      cells.append((name, RUNS[name][1], _fmt(np.mean([r["eval_loss"] for r in mine]), ".4f"),
                    f"{_pct(mean)} +- {_pct(se, '.3f')}"))
  out += report.table(("run", "FP8 recipe", "held-out loss", "vs bf16, same weights"), cells)
  total = _fmt(sum(r["wall_s"] for r in rows) / 60, ".1f")
  out += ["", f"Train loss: mean over the last {max(t.steps // 10, 1)} steps. s/step: median of "
          "the logged intervals (no compilation, no evaluation). Run min: wall time of each "
          f"run's training incl. compilation and evaluation; all runs {total} min, this "
          f"invocation {wall_s / 60:.1f} min.", "",
          "## Quantization error of activations with outliers (e4m3 range check)", "",
          "Relative error ||q - x|| / ||x|| of the ordinary entries (outliers in brackets), "
          "512 x 512 N(0,1) activations, 4 outlier tokens or channels of the given magnitude.", ""]
  cells = []
  for kind in ("token", "channel"):
    for m in sorted({r["magnitude"] for r in qrows}):
      found = [next(r for r in qrows if r["outliers"] == kind and r["magnitude"] == m and
                    r["recipe"] == rec) for rec in QUANT_RECIPES]
      cells.append((kind, f"{m:.0e}", *(f"{c['err_ordinary']:.2e} ({c['err_outliers']:.1e})"
                                         for c in found)))
  out += report.table(("outliers", "magnitude", *QUANT_RECIPES), cells)
  out.append("")
  for kind in ("token", "channel"):
    parts = []
    for rec in QUANT_RECIPES:
      m = absorbed_up_to(qrows, kind, rec)
      parts.append(f"{rec} up to {m:.0e}" if m is not None else f"{rec} beyond "
                   f"{max(r['magnitude'] for r in qrows):.0e}")
    out.append(f"- {kind} outliers absorbed (ordinary entries' error within 2x of no outliers): "
               + ", ".join(parts))
  return "\n".join(out) + "\n"


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
  window = max(1, min(window, len(values)))
  return np.convolve(values, np.ones(window) / window, mode="valid")


def _relative_curve(run: dict, base: dict) -> dict[int, float]:
  """step -> (L - L_bf16) / L_bf16 of one run against its seed's bfloat16 run."""
  b = dict(base["curve"])
  return {s: (l - b[s]) / b[s] for s, l in run["curve"] if s in b}


def plot(path: str, results: dict[int, dict[str, dict]], qrows: list[dict], steps: int):
  """results: seed -> run name -> `train_run`'s result."""
  plt = report.pyplot()

  fig, (ax_loss, ax_diff, ax_q) = plt.subplots(1, 3, figsize=(17, 4.5))
  window = max(steps // 30, 1)
  first = next(iter(results))
  for name in RUNS:
    r = results[first].get(name)
    if r and r["curve"]:
      s, l = (np.array(v) for v in zip(*r["curve"]))
      ax_loss.plot(s[window - 1:], _smooth(l, window), label=name, lw=1)
    curves = [_relative_curve(by_name[name], by_name[BASELINE])
              for by_name in results.values() if name in by_name]
    common = sorted(set.intersection(*map(set, curves))) if curves else []
    if common:
      mean = np.mean([[c[s] for s in common] for c in curves], axis=0)
      ax_diff.plot(np.array(common)[window - 1:], 100 * _smooth(mean, window), label=name, lw=1)
  ax_loss.set(xlabel="step", ylabel=f"train loss (mean of {window} steps)",
              title=f"Loss (seed {first})")
  ax_diff.set(xlabel="step", ylabel="(L - L_bf16) / L_bf16 [%]",
              title=f"Difference to bfloat16, mean of {len(results)} seed(s) "
                    "(float32 = noise floor)")
  ax_diff.axhline(0, color="k", lw=0.5)
  for rec, color in zip(QUANT_RECIPES, ("C2", "C3", "C4")):
    for kind, style in (("token", "-o"), ("channel", "--s")):
      mine = sorted((r for r in qrows if r["recipe"] == rec and r["outliers"] == kind),
                    key=lambda r: r["magnitude"])
      ax_q.loglog([r["magnitude"] for r in mine], [r["err_ordinary"] for r in mine], style,
                  color=color, label=f"{rec}, {kind} outliers", ms=3)
      if rec == "delayed" and kind == "token":  # its failure is the outliers themselves
        ax_q.loglog([r["magnitude"] for r in mine], [r["err_outliers"] for r in mine], ":^",
                    color=color, label="delayed: error of the outliers (saturated)", ms=3)
  ax_q.set(xlabel="outlier magnitude (ordinary entries N(0, 1))",
           ylabel="relative error of the ordinary entries",
           title="e4m3 quantization error with outliers")
  for ax in (ax_loss, ax_diff, ax_q):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  report.save(fig, path, dpi=100, bbox_inches="tight")


def run(config: ExperimentConfig, workdir: str) -> list[dict]:
  """Trains the five runs of every seed, writes the tables and the plot; returns the rows of
  `aggregate` (one per run, means over the seeds)."""
  start = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  qrows = quantization_rows(config.fp8)
  results, rows = {}, []
  for seed in study_seeds(config):
    results[seed] = {}
    for name in RUNS:
      print(f"== fp8_study: seed {seed}, run {name} ({', '.join(RUNS[name])})", flush=True)
      results[seed][name] = train_run(run_config(config, name, seed),
                                      run_dir(workdir, seed, name))
    rows += summarize(results[seed], config.train.steps, seed)
  means = aggregate(rows)
  same = same_weights_rows(config, workdir)
  wall_s = time.perf_counter() - start
  if jax.process_index() == 0:
    report.write_csv(os.path.join(workdir, "fp8_study.csv"), rows, RUN_COLUMNS)
    report.write_csv(os.path.join(workdir, "fp8_study_mean.csv"), means, MEAN_COLUMNS)
    report.write_csv(os.path.join(workdir, "fp8_same_weights.csv"), same, SAME_COLUMNS)
    report.write_csv(os.path.join(workdir, "fp8_quantization.csv"), qrows, QUANT_COLUMNS)
    text = markdown(config, rows, means, same, qrows, wall_s)
    with open(os.path.join(workdir, "fp8_study.md"), "w") as f:
      f.write(text)
    plot(os.path.join(workdir, "fp8_study.png"), results, qrows, config.train.steps)
    print(text, flush=True)
  return means
