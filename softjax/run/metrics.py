"""TensorFlow-free metrics: a JSONL writer that survives resumes, a progress line, a summary.

`metrics.jsonl` holds one JSON object per round. Wall-clock fields (TIMING_FIELDS) are the
only values that differ between an interrupted-and-resumed run and an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable, Mapping

import numpy as np

TIMING_FIELDS = ("round_time_s", "host_time_s", "eval_time_s", "solver_time_s")


def to_python(value: Any) -> Any:
  """Converts jax/numpy scalars and arrays to JSON-ready Python values."""
  if isinstance(value, Mapping):
    return {k: to_python(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_python(v) for v in value]
  if hasattr(value, "shape") or isinstance(value, np.generic):
    array = np.asarray(value)
    return array.item() if array.ndim == 0 else array.tolist()
  return value


def read_rows(path: str) -> list[dict[str, Any]]:
  """All readable rows of a metrics.jsonl file ([] when it does not exist).

  A line that is not one JSON object (a row cut off by a crash mid-write, or damaged later) is
  skipped; `recover_rows` says which rounds that leaves missing.
  """
  return _read(path)[0]


def _read(path: str) -> tuple[list[dict[str, Any]], int]:
  """(rows, number of damaged lines)."""
  if not os.path.exists(path):
    return [], 0
  rows, damaged = [], 0
  with open(path, errors="replace") as f:
    for line in f:
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        row = None
      if isinstance(row, dict) and isinstance(row.get("round"), int) and line.endswith("\n"):
        rows.append(row)
      else:
        damaged += 1
  return rows, damaged


def missing_rounds(rows: Iterable[Mapping[str, Any]], done: int, members: int) -> list[int]:
  """Rounds 1..done for which some member has no row."""
  have = {(r.get("member", 0), r["round"]) for r in rows}
  return [t for t in range(1, done + 1)
          if any((i, t) not in have for i in range(members))]


def recover_rows(path: str, done: int, members: int) -> tuple[list[dict[str, Any]], list[int]]:
  """The rows of rounds 1..done (one per member and round, the last copy of each), and the
  rounds that have none (damaged, cut off, or deleted).

  Rows of later rounds (run after the checkpoint, before an interruption) are dropped: those
  rounds run again.
  """
  rows, _ = _read(path)
  latest = {}
  for row in rows:
    if row["round"] <= done:
      latest[(row.get("member", 0), row["round"])] = row
  kept = [latest[k] for k in sorted(latest, key=lambda k: (k[1], k[0]))]
  return kept, missing_rounds(kept, done, members)


def describe_rounds(rounds: Iterable[int]) -> str:
  """[1, 2, 3, 7] -> '1-3, 7'."""
  spans, rounds = [], sorted(rounds)
  for t in rounds:
    if spans and t == spans[-1][1] + 1:
      spans[-1][1] = t
    else:
      spans.append([t, t])
  return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans)


class MetricsWriter:
  """Appends one JSON object per round to `path`, after rewriting it with the rows to keep.

  On resume from a checkpoint after `resume_round` completed rounds, `kept` are the rows of
  rounds up to it (`recover_rows`); later rows are dropped, because those rounds run again.
  """

  def __init__(self, path: str, kept: list[dict[str, Any]] | None = None):
    self.path = path
    kept = list(kept or [])
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(tmp, path)
    self.rows = kept
    self._file = open(path, "a")

  def write(self, row: Mapping[str, Any]) -> None:
    row = to_python(dict(row))
    self.rows.append(row)
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()

  def close(self) -> None:
    self._file.close()


def _duration(seconds: float) -> str:
  seconds = max(0, int(round(seconds)))
  return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def progress_line(row: Mapping[str, Any], total_rounds: int, rounds_per_s: float) -> str:
  """One line per round: round, loss, accuracy when evaluated, speed and ETA."""
  t = row["round"]
  parts = [f"round {t}/{total_rounds}", f"loss {row['train_loss']:.4f}"]
  if "test_accuracy" in row:
    parts.append(f"acc {row['test_accuracy']:.4f}")
  parts.append(f"{row['cum_uplink_bits'] / 8e6:.1f} MB up")
  eta = (total_rounds - t) / rounds_per_s if rounds_per_s > 0 else math.inf
  parts.append(f"{rounds_per_s:.2f} rounds/s")
  parts.append(f"ETA {_duration(eta) if math.isfinite(eta) else '?'}")
  return " | ".join(parts)


def summary_table(rows: Iterable[Mapping[str, Any]]) -> str:
  """A small markdown table of the evaluated rounds and the run's totals."""
  rows = list(rows)
  lines = ["| round | train_loss | test_accuracy | cum_uplink_MB |", "|---:|---:|---:|---:|"]
  for r in rows:
    if "test_accuracy" in r:
      lines.append(f"| {r['round']} | {r['train_loss']:.4f} | {r['test_accuracy']:.4f} | "
                   f"{r['cum_uplink_bits'] / 8e6:.2f} |")
  if rows:
    total = sum(r.get("round_time_s", 0.0) for r in rows)
    lines.append(f"\nrounds: {rows[-1]['round']}, round time total: {total:.1f} s")
  return "\n".join(lines)
