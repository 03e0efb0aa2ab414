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
  """All rows of a metrics.jsonl file ([] when it does not exist).

  A last line without its newline is a row cut off by a crash mid-write; it is skipped (its
  round has no checkpoint yet, so a resumed run computes it again).
  """
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.endswith("\n") and line.strip()]


class MetricsWriter:
  """Appends one JSON object per round to `path`.

  On resume from a checkpoint after `resume_round` completed rounds, rows of later rounds (run
  after that checkpoint, before the interruption) are dropped, because those rounds run again.
  """

  def __init__(self, path: str, resume_round: int = 0):
    self.path = path
    kept = [r for r in read_rows(path) if r.get("round", 0) <= resume_round]
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
