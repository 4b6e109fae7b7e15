"""What the studies write, written one way: Markdown tables, CSV files and matplotlib figures."""
from __future__ import annotations

import csv
from typing import Sequence


def table(head: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
  """A Markdown table's lines: the header, its rule, one line per row of cells."""
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  return lines + ["| " + " | ".join(str(c) for c in cells) + " |" for cells in rows]


def write_csv(path: str, rows: Sequence[dict], columns: Sequence[str]):
  """One line per row, the given columns in order (None and missing keys empty)."""
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)


def pyplot():
  """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def save(fig, path: str, **savefig_kwargs):
  fig.savefig(path, **savefig_kwargs)
  pyplot().close(fig)
