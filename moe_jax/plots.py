"""A run's PNG plots, drawn from its metrics.jsonl records (metrics.py reads and writes those):
the loss, each MoE layer's expert load over steps, and MaxVio."""
from __future__ import annotations

import os

import numpy as np


def write(workdir: str, records: list[dict]) -> list[str]:
  """Writes loss.png, expert_load.png and max_vio.png from metrics.jsonl's records into
  workdir; returns their paths."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  train = [r for r in records if "loss" in r]
  evals = [r for r in records if "eval_loss" in r]
  written = []

  def save(fig, name):
    path = os.path.join(workdir, name)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    written.append(path)

  fig, ax = plt.subplots(figsize=(7, 4))
  ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
  if evals:
    ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out")
  ax.set(xlabel="step", ylabel="loss (nats/token)", title="Loss")
  ax.legend()
  ax.grid(alpha=0.3)
  save(fig, "loss.png")

  moe = [r for r in train if r.get("load")]
  if moe:
    load_TxLxE = np.array([r["load"] for r in moe])
    steps = [r["step"] for r in moe]
    layers, experts = load_TxLxE.shape[1], load_TxLxE.shape[2]
    fig, axes = plt.subplots(layers, 1, figsize=(7, 1.2 + 1.8 * layers), squeeze=False)
    for l, ax in enumerate(axes[:, 0]):
      # Load relative to a perfectly balanced router (1 = each expert gets 1/E).
      # One logged step spans half a step either side (equal limits would warn on stderr).
      first, last = (steps[0], steps[-1]) if steps[-1] > steps[0] else (steps[0] - .5, steps[0] + .5)
      image = ax.imshow(load_TxLxE[:, l, :].T * experts, aspect="auto", origin="lower",
                        cmap="viridis", extent=(first, last, -0.5, experts - 0.5))
      ax.set(ylabel=f"MoE layer {l}\nexpert")
      fig.colorbar(image, ax=ax, label="load x E")
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].set_title("Expert load per MoE layer (1 = balanced)")
    save(fig, "expert_load.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    max_vio = np.array([r["max_vio"] for r in moe])
    for l in range(max_vio.shape[1]):
      ax.plot(steps, max_vio[:, l], label=f"MoE layer {l}")
    ax.set(xlabel="step", ylabel="MaxVio (max load / mean load - 1)", title="Load imbalance")
    ax.legend()
    ax.grid(alpha=0.3)
    save(fig, "max_vio.png")
  return written
