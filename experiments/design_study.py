"""DeepSeek-V3's design claims as studies: arms of one model trained on the same data and steps.

  balance_study      none | auxiliary loss (alpha 1e-3) | aux-loss-free bias (the config's
                     gamma) | aux-loss-free + the sequence-wise loss (1e-4)
  granularity_study  coarse (8 experts top-1) | fine (32 top-4) | fine + shared (64 top-6 plus a
                     shared expert of two experts' width) | dense: equal active FFN width (512,
                     the dense block's) and, for the MoE arms, equal total routed width
  mtp_study          no MTP | MTP depth 1 with V3's weight schedule (0.3, then 0.1 for the last
                     32% of the steps)

Each arm runs for every seed of `config.seeds` in <workdir>/runs/<arm>/seed<s> (the real trainer;
a rerun resumes unfinished runs and skips finished ones). Per run: the held-out cross-entropy of
the main model at each evaluation (no MTP or balance loss added: they differ between arms),
MaxVio_batch from the logged steps (max over MoE layers; its mean over the second half of
training), and MaxVio_global: the final weights' expert loads summed over the held-out
evaluation batches, max load / mean load - 1, max over layers. Training FLOPs are 6 x activated
parameters x tokens (the usual estimate; attention's score FLOPs left out, equal across arms).

Outputs in the workdir: <study>.md (table, per-arm means with the spread over seeds), <study>.csv
(one row per arm and seed), <study>.png (held-out loss against training FLOPs; MaxVio_batch
against step) and, for MoE studies, <study>_load.png (held-out load per layer and expert, seed 0).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time

import jax
import numpy as np

from experiments import report
from experiments.study_runs import mean_se, train_run
from moe_jax import metrics, model, train
from moe_jax.config import ConfigError, ExperimentConfig

ARMS = {
    "balance_study": {
        "none": {"moe": dict(bias_update_rate=0.0, aux_loss_coef=0.0, seq_aux_loss_coef=0.0)},
        "aux_loss": {"moe": dict(bias_update_rate=0.0, aux_loss_coef=1e-3,
                                 seq_aux_loss_coef=0.0)},
        "aux_free": {"moe": dict(aux_loss_coef=0.0, seq_aux_loss_coef=0.0)},
        "aux_free+seq": {"moe": dict(aux_loss_coef=0.0, seq_aux_loss_coef=1e-4)},
    },
    "granularity_study": {
        "8e_top1": {"moe": dict(num_experts=8, top_k=1, expert_ffn_dim=512,
                                num_shared_experts=0)},
        "32e_top4": {"moe": dict(num_experts=32, top_k=4, expert_ffn_dim=128,
                                 num_shared_experts=0)},
        "64e_top6+shared": {"moe": dict(num_experts=64, top_k=6, expert_ffn_dim=64,
                                        num_shared_experts=2)},
        "dense": {"model": dict(first_k_dense=-1)},  # -1: every block (set per model below)
    },
    "mtp_study": {
        "no_mtp": {"model": dict(mtp_depth=0)},
        "mtp_1": {"model": dict(mtp_depth=1, mtp_loss_weight=0.3, mtp_loss_weight_late=0.1,
                                mtp_late_from=10 / 14.8)},
    },
}
# What DeepSeek published, next to our figures in the tables.
PUBLISHED = {
    "balance_study": "Aux-loss-free paper (1B, Table 1): aux loss MaxVio_global 0.72, ppl 9.56; "
                     "aux-loss-free MaxVio_global 0.04, ppl 9.50.",
    "granularity_study": "DeepSeekMoE (2B, Table 1/Fig. 3): fine-grained + shared experts beat "
                         "coarse (GShard-style) MoE at equal active compute; MoE beats dense.",
    "mtp_study": "DeepSeek-V3 (Table 4): MTP depth 1 lowers the main model's loss on most "
                 "benchmarks at equal training tokens; the MTP module is dropped at inference.",
}
COLUMNS = ("arm", "seed", "steps", "final_eval_loss", "final_train_loss", "max_vio_batch",
           "max_vio_global", "train_flops", "active_params", "total_params", "s_per_step",
           "wall_s")


def arm_config(cfg: ExperimentConfig, study: str, arm: str, seed: int) -> ExperimentConfig:
  change = ARMS[study][arm]
  model_change = dict(change.get("model", {}))
  if model_change.get("first_k_dense") == -1:
    model_change["first_k_dense"] = cfg.model.num_layers
  return dataclasses.replace(
      cfg, experiment="train", seeds=(),
      model=dataclasses.replace(cfg.model, **model_change),
      moe=dataclasses.replace(cfg.moe, **change.get("moe", {})),
      train=dataclasses.replace(cfg.train, seed=seed))


def run_dir(workdir: str, arm: str, seed: int) -> str:
  return os.path.join(workdir, "runs", arm, f"seed{seed}")


@functools.partial(jax.jit, static_argnums=(3,))
def _heldout_load(params, moe_state, batch, cfg: ExperimentConfig):
  _, aux = model.loss(params, moe_state, batch, cfg.model, cfg.moe, cfg.fp8)
  return aux["load"]


def heldout_load(cfg: ExperimentConfig, workdir: str) -> np.ndarray:
  """[MoE layers, experts] share of the held-out assignments under the final weights."""
  setup, state, _ = train.load_state(cfg, workdir)
  with jax.set_mesh(setup.mesh):
    total = sum(_heldout_load(state["params"], state["moe_state"], setup.batches.eval(i), cfg)
                for i in range(cfg.train.eval_batches))
  total = np.asarray(total, np.float64)
  return total / np.maximum(total.sum(-1, keepdims=True), 1.0)


def max_vio(load_LxE: np.ndarray) -> float:
  """max over layers of (max load / mean load - 1)."""
  return float(np.max(load_LxE.max(-1) / load_LxE.mean(-1) - 1))


def one_run(cfg: ExperimentConfig, workdir: str) -> dict:
  result = train_run(cfg, workdir)
  logged = metrics.read_jsonl(os.path.join(workdir, metrics.METRICS_FILE))
  # The main model's held-out cross-entropy: eval_loss adds the MTP and balance losses, which
  # differ between arms.
  result["evals"] = [(r["step"], r["eval_ce"]) for r in logged if "eval_ce" in r]
  last = result["evals"][-1] if result["evals"] else (None, float("nan"))
  result["final_eval_loss"] = last[1] if last[0] == cfg.train.steps else float("nan")
  records = [r for r in logged if r.get("max_vio")]
  result["max_vio_curve"] = [(r["step"], max(r["max_vio"])) for r in records]
  second_half = [v for s, v in result["max_vio_curve"] if s > cfg.train.steps // 2]
  result["max_vio_batch"] = float(np.mean(second_half)) if second_half else float("nan")
  is_moe = cfg.model.first_k_dense < cfg.model.num_layers
  result["load"] = heldout_load(cfg, workdir) if is_moe else None
  result["max_vio_global"] = max_vio(result["load"]) if is_moe else float("nan")
  counts = model.count_params(cfg.model, cfg.moe)
  result["active_params"] = counts["main"]["activated"]["all"] + counts["mtp"]["activated"]["all"]
  result["total_params"] = counts["main"]["total"]["all"] + counts["mtp"]["total"]["all"]
  result["flops_per_step"] = 6 * result["active_params"] * cfg.train.batch_size * cfg.train.seq_len
  return result


def markdown(study: str, config: ExperimentConfig, rows: list[dict], wall_s: float) -> str:
  t = config.train
  lines = [f"# {study}", "",
           f"`python -m experiments.run --config=configs/{study}.py`: {t.steps} steps of "
           f"{t.batch_size} x {t.seq_len} tokens per run, seeds {list(config.seeds)}; the runs "
           f"trained for {sum(r['wall_s'] for r in rows) / 60:.1f} minutes in all (this "
           f"invocation took {wall_s / 60:.1f}).", "",
           "Means over the seeds, +- the spread (half the range of the seeds' values):", ""]
  table = []
  for arm in ARMS[study]:
    mine = [r for r in rows if r["arm"] == arm]
    cells = [arm]
    for key, fmt in (("final_eval_loss", "{:.4f}"), ("max_vio_batch", "{:.3f}"),
                     ("max_vio_global", "{:.3f}")):
      values = [r[key] for r in mine]
      if all(np.isnan(values)):
        cells.append("-")
        continue
      mean, _ = mean_se(values)
      spread = (max(values) - min(values)) / 2
      cells.append(f"{fmt.format(mean)} +- {fmt.format(spread)}")
    cells += [f"{mine[0]['active_params']:,}", f"{mine[0]['total_params']:,}",
              f"{mine[0]['train_flops']:.3g}", f"{np.mean([r['s_per_step'] for r in mine]):.2f}"]
    table.append(cells)
  lines += report.table(("arm", "held-out CE", "MaxVio_batch (2nd half)", "MaxVio_global",
                         "active params", "total params", "train FLOPs", "s/step"), table)
  lines += ["", f"Published: {PUBLISHED[study]}", ""]
  return "\n".join(lines)


def plot(path: str, study: str, results: dict, steps: int):
  plt = report.pyplot()
  fig, (ax_loss, ax_vio) = plt.subplots(1, 2, figsize=(12, 4.2))
  for i, arm in enumerate(ARMS[study]):
    for j, r in enumerate(results[arm].values()):
      if r["evals"]:
        s, l = zip(*r["evals"])
        ax_loss.plot(np.array(s) * r["flops_per_step"], l, "o-" if j == 0 else "s--",
                     color=f"C{i}", label=f"{arm}" if j == 0 else None, lw=1, ms=3)
      if r["max_vio_curve"]:
        s, v = zip(*r["max_vio_curve"])
        ax_vio.plot(s, v, color=f"C{i}", label=arm if j == 0 else None, lw=1,
                    alpha=1.0 if j == 0 else 0.5)
  ax_loss.set(xlabel="training FLOPs (6 x activated params x tokens)",
              ylabel="held-out cross-entropy (main model)",
              title="Held-out loss (each seed a line)")
  ax_vio.set(xlabel="step", ylabel="MaxVio_batch (max over MoE layers)", yscale="log",
             title="Load imbalance during training")
  for ax in (ax_loss, ax_vio):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  report.save(fig, path, dpi=100, bbox_inches="tight")


def plot_loads(path: str, study: str, results: dict):
  plt = report.pyplot()
  arms = [a for a in ARMS[study] if next(iter(results[a].values()))["load"] is not None]
  fig, axes = plt.subplots(1, len(arms), figsize=(3.6 * len(arms), 3), squeeze=False)
  for ax, arm in zip(axes[0], arms):
    load = next(iter(results[arm].values()))["load"]
    image = ax.imshow(load * load.shape[1], aspect="auto", cmap="viridis", vmin=0,
                      vmax=max(2.0, float((load * load.shape[1]).max())))
    ax.set(title=arm, xlabel="expert", ylabel="MoE layer", yticks=range(load.shape[0]))
    fig.colorbar(image, ax=ax, label="held-out load x E (1 = balanced)")
  fig.tight_layout()
  report.save(fig, path, dpi=100, bbox_inches="tight")


def run(config: ExperimentConfig, workdir: str) -> list[dict]:
  study = config.experiment
  if config.model.first_k_dense >= config.model.num_layers:
    raise ConfigError(f"model.first_k_dense={config.model.first_k_dense}: a study of MoE "
                      f"arms needs MoE blocks (< num_layers={config.model.num_layers})")
  seeds = config.seeds or (config.train.seed,)
  start = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  results, rows = {}, []
  for arm in ARMS[study]:
    results[arm] = {}
    for seed in seeds:
      print(f"== {study}: arm {arm}, seed {seed}", flush=True)
      cfg = arm_config(config, study, arm, seed)
      r = results[arm][seed] = one_run(cfg, run_dir(workdir, arm, seed))
      rows.append({"arm": arm, "seed": seed, "steps": cfg.train.steps,
                   "final_eval_loss": r["final_eval_loss"],
                   "final_train_loss": r["final_train_loss"],
                   "max_vio_batch": r["max_vio_batch"], "max_vio_global": r["max_vio_global"],
                   "train_flops": r["flops_per_step"] * cfg.train.steps,
                   "active_params": r["active_params"], "total_params": r["total_params"],
                   "s_per_step": r["s_per_step"], "wall_s": r["wall_s"]})
  wall_s = time.perf_counter() - start
  if jax.process_index() == 0:
    report.write_csv(os.path.join(workdir, f"{study}.csv"), rows, COLUMNS)
    text = markdown(study, dataclasses.replace(config, seeds=tuple(seeds)), rows, wall_s)
    with open(os.path.join(workdir, f"{study}.md"), "w") as f:
      f.write(text)
    plot(os.path.join(workdir, f"{study}.png"), study, results, config.train.steps)
    if any(next(iter(results[a].values()))["load"] is not None for a in ARMS[study]):
      plot_loads(os.path.join(workdir, f"{study}_load.png"), study, results)
    print(text, flush=True)
  return rows
