"""The runs of a study: each one the real trainer in its own workdir, resumable, timed."""
from __future__ import annotations

import os
import time

import jax
import numpy as np

from moe_jax import metrics, train, workdir as workdirs
from moe_jax.config import ConfigError, ExperimentConfig, from_config_dict

WALL_FILE = "study_wall_s.json"  # per run: seconds its training took, summed over resumptions


def check_run_dir(cfg: ExperimentConfig, workdir: str):
  stored = workdirs.read_json(os.path.join(workdir, train.CONFIG_FILE))  # None: torn or absent
  # Parsed, not compared as JSON: a run written before a config field existed has it at its
  # default.
  if stored is not None and from_config_dict(stored) != cfg:
    runs, seed_dir = os.path.split(os.path.dirname(workdir))
    raise ConfigError(f"workdir={os.path.dirname(runs)!r}: its run "
                      f"{seed_dir}/{os.path.basename(workdir)} used another config; use "
                      "another --workdir for a new study")


def _add_wall_s(wall_path: str, records: list[dict], done_before: int, wall_s: float) -> float:
  """This run's training seconds summed over its resumptions, kept in wall_path."""
  trained = max((r["step"] for r in records), default=0) > done_before
  if os.path.exists(wall_path):
    stored = workdirs.read_json(wall_path)  # null: unknown (NaN is not JSON)
    wall_s = (float("nan") if stored is None else stored) + (wall_s if trained else 0.0)
  elif not trained:  # finished by an earlier version that kept no time: unknown
    wall_s = float("nan")
  if jax.process_index() == 0:
    workdirs.write_json(wall_path, wall_s)
  return wall_s


def train_run(cfg: ExperimentConfig, workdir: str) -> dict:
  """Trains (or finishes) one run; its curves and final figures from its metrics.jsonl."""
  check_run_dir(cfg, workdir)
  log, wall_path = os.path.join(workdir, metrics.METRICS_FILE), os.path.join(workdir, WALL_FILE)
  done_before = max((r["step"] for r in metrics.read_jsonl(log)), default=0)
  start = time.perf_counter()
  try:
    train.train(cfg, workdir)
  except train.Preempted:  # saved; the study stops with it, keeping the time spent
    _add_wall_s(wall_path, metrics.read_jsonl(log), done_before, time.perf_counter() - start)
    raise
  records = metrics.read_jsonl(log)
  wall_s = _add_wall_s(wall_path, records, done_before, time.perf_counter() - start)
  steps, t = cfg.train.steps, cfg.train
  curve = [(r["step"], r["loss"]) for r in records if "loss" in r and r["loss"] is not None]
  evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
  last = [loss for step, loss in curve if step > steps - max(steps // 10, 1)]
  rates = [r["tokens_per_s"] for r in records if r.get("tokens_per_s")]
  return {"curve": curve, "evals": evals, "wall_s": wall_s,
          "final_train_loss": float(np.mean(last)) if last else float("nan"),
          "final_eval_loss": evals[-1][1] if evals and evals[-1][0] == steps else float("nan"),
          "s_per_step": (t.batch_size * t.seq_len / float(np.median(rates)) if rates
                         else float("nan"))}


def mean_se(values: list[float]) -> tuple[float, float]:
  """Mean and its standard error (sample std / sqrt(n); nan for one value)."""
  v = np.asarray(values, np.float64)
  se = float(np.std(v, ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")
  return float(np.mean(v)), se
