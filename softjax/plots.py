"""Plots for the reproduction drivers (matplotlib, no display needed)."""

from __future__ import annotations

from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # files only: works on machines and CI runs without a display
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

LINESTYLES = ("-", "--", ":", "-.")


def accuracy_curves(records: Sequence[dict[str, Any]], path: str, title: str = "") -> None:
  """Test accuracy vs round and vs cumulative uplink, one line per (method, rank) record.

  Each record holds `method`, `rank` and `curve` = {round, test_accuracy, cum_uplink_bits}.
  """
  fig, (by_round, by_bits) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
  methods = sorted({r["method"] for r in records})
  ranks = sorted({r["rank"] for r in records})
  colors = {m: f"C{i}" for i, m in enumerate(methods)}
  for r in records:
    curve = r["curve"]
    style = dict(color=colors[r["method"]], linestyle=LINESTYLES[ranks.index(r["rank"]) % 4],
                 marker="o", markersize=3, label=f"{r['method']} r={r['rank']}")
    by_round.plot(curve["round"], curve["test_accuracy"], **style)
    by_bits.plot([b / 8e6 for b in curve["cum_uplink_bits"]], curve["test_accuracy"], **style)
  by_round.set_xlabel("round")
  by_round.set_ylabel("test accuracy")
  by_bits.set_xlabel("cumulative uplink (MB)")
  by_bits.set_xscale("log")
  by_bits.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # no crowded labels
  by_bits.legend(fontsize=7, ncol=2)
  for ax in (by_round, by_bits):
    ax.grid(alpha=0.3)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
