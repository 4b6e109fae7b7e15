"""`experiment=r1_thinking_sweep`: where does RL take off? experiment=r1_thinking for every long
share in rl.long_shares and every seed in `seeds`, each in <workdir>/runs/ls<share>/seed<s>
(resumed where it stopped, skipped when finished), then one table and one plot: held-out pass@1
and response length against the long share, for the base, after RL and after NTP-only.

  python -m experiments.run --config=configs/r1_thinking_sweep.py --workdir=/tmp/think_sweep

Outputs: r1_thinking_sweep.md, .csv and .png in the workdir.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from experiments import r1_thinking, report
from experiments.study_runs import mean_se
from moe_jax.config import ConfigError, ExperimentConfig

COLUMNS = ("long_share", "seed", "base_pass@1", "rl_pass@1", "ntp_pass@1", "base_length",
           "rl_length", "ntp_length", "base_long_share", "rl_long_share", "ntp_long_share")
ARMS = (("base", "before"), ("rl", "after"), ("ntp", "ntp"))


def runs_of(cfg: ExperimentConfig) -> list[tuple[float, int, ExperimentConfig]]:
  """(long share, seed, the run's config) for every point of the sweep; ConfigError if the
  sweep's keys are bad."""
  shares = cfg.rl.get("long_shares")
  if not isinstance(shares, (list, tuple)) or not shares or len(set(shares)) != len(shares) or \
      not all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x <= 1
              for x in shares):
    raise ConfigError(f"rl.long_shares={shares!r}: must be a list of distinct numbers in [0, 1]")
  seeds = cfg.seeds or (cfg.train.seed,)
  out = []
  for share in shares:
    for seed in seeds:
      rl = {k: v for k, v in cfg.rl.items() if k != "long_shares"}
      rl.update(long_share=float(share), seed=seed)
      out.append((float(share), seed, dataclasses.replace(
          cfg, experiment="r1_thinking", seeds=(), rl=rl,
          train=dataclasses.replace(cfg.train, seed=seed))))
  for _, _, run_cfg in out:  # every run's config checked before the first one starts
    r1_thinking.make_study(run_cfg, r1_thinking.rl_config.from_dict(run_cfg.rl))
  return out


def run(cfg: ExperimentConfig, workdir: str):
  rows = []
  for share, seed, run_cfg in runs_of(cfg):
    out = r1_thinking.run(run_cfg, os.path.join(workdir, "runs", f"ls{share:g}", f"seed{seed}"))
    row = {"long_share": share, "seed": seed}
    for arm, key in ARMS:
      held = out[key]["heldout"]
      row.update({f"{arm}_pass@1": held["pass@1"], f"{arm}_length": held["mean_length"],
                  f"{arm}_long_share": held["long_share"]})
    rows.append(row)
  write_report(workdir, rows)


def write_report(workdir: str, rows: list[dict]):
  report.write_csv(os.path.join(workdir, "r1_thinking_sweep.csv"), rows, COLUMNS)
  shares = sorted({r["long_share"] for r in rows})
  table = []
  for share in shares:
    at = [r for r in rows if r["long_share"] == share]
    cell = lambda key: "{:.3f} ± {:.3f}".format(*mean_se([r[key] for r in at]))
    table.append([f"{share:g}", str(len(at))] + [cell(f"{a}_pass@1") for a, _ in ARMS] +
                 [cell(f"{a}_length") for a, _ in ARMS] + [cell("rl_long_share")])
  lines = ["# R1-Zero thinking: the long-share sweep (held-out pass@1 and length; mean ± s.e. "
           "over seeds)", ""]
  lines += report.table(["long share", "seeds", "base pass@1", "RL pass@1", "NTP pass@1",
                         "base length", "RL length", "NTP length", "RL long share"], table)
  text = "\n".join(lines) + "\n"
  with open(os.path.join(workdir, "r1_thinking_sweep.md"), "w") as f:
    f.write(text)
  print(text)
  plt = report.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, figure in zip(axes, ("pass@1", "length")):
    for arm, label in (("base", "base"), ("rl", "RL"), ("ntp", "NTP-only")):
      means = [np.mean([r[f"{arm}_{figure}"] for r in rows if r["long_share"] == s])
               for s in shares]
      line, = ax.plot(shares, means, marker="o", label=label)
      ax.scatter([r["long_share"] for r in rows], [r[f"{arm}_{figure}"] for r in rows],
                 color=line.get_color(), alpha=0.4, s=12)
    ax.set_xscale("symlog", linthresh=0.005)
    ax.set_xlabel("long share of the base corpus")
    ax.set_title(f"held-out {figure}")
    ax.legend()
  fig.tight_layout()
  report.save(fig, os.path.join(workdir, "r1_thinking_sweep.png"))
