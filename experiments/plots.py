"""Plots for the reproduction drivers (matplotlib, no display needed)."""

from __future__ import annotations

from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # files only: works on machines and CI runs without a display
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

LINESTYLES = ("-", "--", ":", "-.")


def _seed_band(curves: Sequence[dict[str, list]], key: str) -> tuple[np.ndarray, np.ndarray]:
  """Per evaluation: the mean over seeds and its Student-t 95 % half-width (0 for one seed)."""
  values = np.array([c[key] for c in curves], dtype=float)  # [seeds, evaluations]
  n = values.shape[0]
  half = (stats.t.ppf(0.975, n - 1) * values.std(axis=0, ddof=1) / np.sqrt(n) if n > 1
          else np.zeros(values.shape[1]))
  return values.mean(axis=0), half


def _half_width(values: Sequence[float]) -> float:
  """Student-t 95 % half-width of the mean of `values` (0 for one value)."""
  n = len(values)
  return float(stats.t.ppf(0.975, n - 1) * np.std(values, ddof=1) / np.sqrt(n)) if n > 1 else 0.0


def accuracy_curves(records: Sequence[dict[str, Any]], label, path: str,
                    title: str = "") -> None:
  """Test accuracy vs round and vs cumulative uplink: per seeded run the mean over its seeds
  with a 95 % band, one line per run (colour by label, line style by rank).

  Records are experiments/seeded.py run summaries; `label(record)` names a line.
  """
  fig, (by_round, by_bits) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
  labels = sorted({label(r) for r in records})
  ranks = sorted({r["rank"] or 0 for r in records})  # None (a controller's choice) as 0
  colors = {m: f"C{i % 10}" for i, m in enumerate(labels)}
  for r in records:
    curves = [s["curve"] for s in r["per_seed"]]
    acc, half = _seed_band(curves, "test_accuracy")
    rounds = curves[0]["round"]
    mb = _seed_band(curves, "cum_uplink_bits")[0] / 8e6
    style = dict(color=colors[label(r)], linestyle=LINESTYLES[ranks.index(r["rank"] or 0) % 4])
    name = f"{label(r)} r={r['rank']}" if r["rank"] else label(r)
    for ax, x in ((by_round, rounds), (by_bits, mb)):
      ax.plot(x, acc, label=name if ax is by_bits else None, **style)
      ax.fill_between(x, acc - half, acc + half, color=style["color"], alpha=0.15, linewidth=0)
  by_round.set_xlabel("round")
  by_round.set_ylabel("test accuracy (mean over seeds, 95 % band)")
  by_bits.set_xlabel("cumulative uplink (MB)")
  by_bits.set_xscale("log")
  by_bits.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # no crowded labels
  by_bits.legend(fontsize=6, ncol=2)
  _finish(fig, (by_round, by_bits), title, path)


def _finish(fig, axes, title: str, path: str) -> None:
  """Grid on every axis, the title, and the file; the figure is closed."""
  for ax in axes:
    ax.grid(alpha=0.3)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def accuracy_vs_rank(rows: Sequence[dict[str, Any]], path: str, title: str = "") -> None:
  """E2: final accuracy (mean over seeds, 95 % interval) of each fixed rank, TSFA's at its
  most frequent rbar; and each run's seed-mean virtual queue over the rounds with its band.

  Rows hold `method` (osfa | tsfa), `rank` (None for tsfa), `seed_ranks`, and per seed
  `final_accuracy` and `queue` (per round).
  """
  fig, (acc, queue) = plt.subplots(1, 2, figsize=(11, 4))
  fixed = sorted((r for r in rows if r["method"] != "tsfa"), key=lambda r: r["rank"])
  means = [np.mean(r["final_accuracy"]) for r in fixed]
  halves = [_half_width(r["final_accuracy"]) for r in fixed]
  acc.errorbar([r["rank"] for r in fixed], means, yerr=halves, fmt="o-", capsize=3,
               label="OSFA (fixed rank)")
  for r in rows:
    if r["method"] == "tsfa":
      rbar = max(set(r["seed_ranks"]), key=r["seed_ranks"].count)
      acc.errorbar([rbar], [np.mean(r["final_accuracy"])], yerr=[_half_width(
          r["final_accuracy"])], fmt="r*", markersize=14, capsize=3,
          label=f"TSFA (rbar = {rbar} in {r['seed_ranks'].count(rbar)}/"
                f"{len(r['seed_ranks'])} seeds)")
  acc.set_xscale("log", base=2)
  acc.set_xlabel("LoRA rank")
  acc.set_ylabel("final test accuracy")
  acc.legend(fontsize=8)
  for i, r in enumerate(rows):
    _banded(queue, r["queue"], f"C{i % 10}",
            "tsfa" if r["method"] == "tsfa" else f"osfa r={r['rank']}")
  queue.set_xlabel("round")
  queue.set_ylabel("virtual queue Q (mean over seeds)")
  queue.legend(fontsize=7, ncol=2)
  _finish(fig, (acc, queue), title, path)


def accuracy_vs_bits_with_target(runs: Sequence[dict[str, Any]],
                                 rows: Sequence[dict[str, Any]], path: str,
                                 title: str = "") -> None:
  """E4: seed-mean accuracy (95 % band) against seed-mean cumulative uplink per method, the
  target as a line and each method's mean uplink to it as a marker.

  `runs` are experiments/seeded.py summaries, `rows` the E4 rows in the same order."""
  fig, ax = plt.subplots(figsize=(6.5, 4))
  target = rows[0]["target_accuracy"]
  for i, (run, row) in enumerate(zip(runs, rows)):
    curves = [s["curve"] for s in run["per_seed"]]
    acc, half = _seed_band(curves, "test_accuracy")
    mb = _seed_band(curves, "cum_uplink_bits")[0] / 8e6
    ax.plot(mb, acc, "-", color=f"C{i}", label=row["method"])
    ax.fill_between(mb, acc - half, acc + half, color=f"C{i}", alpha=0.15, linewidth=0)
    reached = [m for m in row["mb_to_target"] if m is not None]
    if reached:
      ax.plot([np.mean(reached)], [target], "x", color=f"C{i}", markersize=10)
  ax.axhline(target, color="gray", linestyle="--", label=f"target {target:.3f}")
  ax.set_xscale("log")
  ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  ax.set_xlabel("cumulative uplink (MB, mean over seeds)")
  ax.set_ylabel("test accuracy (mean over seeds)")
  ax.legend(fontsize=8)
  _finish(fig, (ax,), title, path)


def _bars(ax, rows: Sequence[dict[str, Any]], key: str) -> None:
  """One bar per row: the seed mean of `key` with its 95 % interval."""
  means = [np.mean(r[key]) for r in rows]
  ax.bar([r["label"] for r in rows], means, yerr=[_half_width(r[key]) for r in rows],
         capsize=4, color=[f"C{i % 10}" for i in range(len(rows))])
  ax.set_ylim(min(means) - 0.05, None)


def _banded(ax, series: Sequence[Sequence[float]], color: str, label: str,
            floor: float | None = None) -> None:
  """The seed mean of a per-round series with its 95 % band (its lower edge held at `floor`,
  for a log axis, where a band below 0 cannot be drawn)."""
  mean, half = _seed_band([{"v": v} for v in series], "v")
  t = np.arange(1, len(mean) + 1)
  lower = mean - half if floor is None else np.maximum(mean - half, floor)
  ax.plot(t, mean, color=color, label=label)
  ax.fill_between(t, lower, mean + half, color=color, alpha=0.15, linewidth=0)


def covariance_vs_severity(rows: Sequence[dict[str, Any]], path: str, title: str = "") -> None:
  """E3: the covariance term per round for each partition (seed mean, 95 % band), and final
  accuracy per partition (seed mean, 95 % interval).

  Rows hold `label` (shards per client or "iid") and per seed `cov_term` (per round) and
  `final_accuracy`.
  """
  fig, (cov, acc) = plt.subplots(1, 2, figsize=(11, 4))
  _covariance_panel(cov, rows, lambda r: f"shards/client {r['label']}")
  _bars(acc, rows, "final_accuracy")
  acc.set_xlabel("shards per client (fewer = more skewed)")
  acc.set_ylabel("final test accuracy")
  _finish(fig, (cov, acc), title, path)


def _covariance_panel(ax, rows: Sequence[dict[str, Any]], name, floor=None) -> None:
  """Each row's covariance term per round (seed mean, 95 % band) on a log axis, labelled
  `name(row)`."""
  for i, r in enumerate(rows):
    _banded(ax, r["cov_term"], f"C{i % 10}", name(r), floor)
  ax.set_xlabel("round")
  ax.set_ylabel("cov_term")
  ax.set_yscale("log")
  ax.legend(fontsize=8)


COV_FLOOR = 1e-5  # E7's log axis starts here; the bands of 3 seeds reach below 0


def covariance_curves(rows: Sequence[dict[str, Any]], path: str, title: str = "") -> None:
  """E7: the aggregation error each rule leaves, per round (seed mean, 95 % band held at
  COV_FLOOR). The exact rules' term is 0 up to float32 round-off: below COV_FLOOR in every round
  and seed, it is not drawn, and those rules are named under the axis instead.

  Rows hold `label` and per seed `cov_term` (per round).
  """
  exact = [r["label"] for r in rows if np.max(np.abs(r["cov_term"])) < COV_FLOOR]
  fig, ax = plt.subplots(figsize=(7, 4.5))
  _covariance_panel(ax, [r for r in rows if r["label"] not in exact], lambda r: r["label"],
                    COV_FLOOR)
  ax.set_ylim(bottom=COV_FLOOR)
  if exact:
    ax.set_xlabel(f"round   (below {COV_FLOOR:g} in every round, not drawn: "
                  + ", ".join(exact) + ")")
  _finish(fig, (ax,), title, path)


def heatmaps(records: Sequence[dict[str, Any]], row_key: str, col_key: str,
             value_keys: Sequence[str], path: str, title: str = "") -> None:
  """One annotated heat map per value over the (row_key x col_key) grid of the records (a
  value given per seed is shown as its mean)."""
  rows = sorted({r[row_key] for r in records})
  cols = sorted({r[col_key] for r in records})
  fig, axes = plt.subplots(1, len(value_keys), figsize=(5.5 * len(value_keys), 4))
  axes = list(np.atleast_1d(axes))
  for ax, key in zip(axes, value_keys):
    grid = np.full((len(rows), len(cols)), np.nan)
    for r in records:
      grid[rows.index(r[row_key]), cols.index(r[col_key])] = np.mean(r[key])  # seed mean
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    for (i, j), value in np.ndenumerate(grid):
      ax.text(j, i, f"{value:.3f}", ha="center", va="center", color="w", fontsize=9)
    ax.set_xticks(range(len(cols)), [f"{c:g}" for c in cols])
    ax.set_yticks(range(len(rows)), [f"{v:g}" for v in rows])
    ax.set_xlabel(col_key)
    ax.set_ylabel(row_key)
    ax.set_title(key)
    fig.colorbar(image, ax=ax)
  _finish(fig, [], title, path)


def run_overview(rows: Sequence[dict[str, Any]], path: str, title: str = "") -> None:
  """One run's metrics.jsonl rows: accuracy vs round and vs uplink, latency and queue vs round."""
  evaluated = [r for r in rows if "test_accuracy" in r]
  fig, (acc, by_bits, latency) = plt.subplots(1, 3, figsize=(14, 3.8))
  acc.plot([r["round"] for r in evaluated], [r["test_accuracy"] for r in evaluated], "o-")
  acc.set_xlabel("round")
  acc.set_ylabel("test accuracy")
  by_bits.plot([r["cum_uplink_bits"] / 8e6 for r in evaluated],
               [r["test_accuracy"] for r in evaluated], "o-")
  by_bits.set_xlabel("cumulative uplink (MB)")
  by_bits.set_ylabel("test accuracy")
  latency.plot([r["round"] for r in rows], [r["latency_s"] for r in rows], label="latency (s)")
  latency.set_xlabel("round")
  latency.set_ylabel("round latency (s)")
  queue = latency.twinx()
  queue.plot([r["round"] for r in rows], [r["queue"] for r in rows], color="C1", label="queue")
  queue.set_ylabel("virtual queue Q", color="C1")
  _finish(fig, (acc, by_bits, latency), title, path)


def queues_and_accuracy(rows: Sequence[dict[str, Any]], path: str, title: str = "") -> None:
  """E6: each row's virtual queue over the rounds (seed mean, 95 % band), and its final
  accuracy (seed mean, 95 % interval). Rows hold `label`, and per seed `queue` and
  `final_accuracy`."""
  fig, (queue, acc) = plt.subplots(1, 2, figsize=(11, 4))
  for i, r in enumerate(rows):
    _banded(queue, r["queue"], f"C{i % 10}", r["label"])
  queue.set_xlabel("round")
  queue.set_ylabel("virtual queue Q")
  queue.legend(fontsize=8)
  _bars(acc, rows, "final_accuracy")
  acc.set_ylabel("final test accuracy")
  _finish(fig, (queue, acc), title, path)
