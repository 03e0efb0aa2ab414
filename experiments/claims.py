"""docs/results/summary.json: one record per claim row, the numbers docs/results.md shows.

Each record: experiment, method, rank, keep_ratio, metric, mean, ci95 (Student-t 95 %
half-width; None from one seed), n_seeds, seeds, and the command that produced it. An
experiment's driver replaces its own records and keeps every other experiment's.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Sequence

from experiments import stats
from softjax import errors


def command() -> str:
  """This process's reproduce command line."""
  return " ".join(["python -m experiments.reproduce"] + sys.argv[1:])


def claim(experiment: str, method: str, rank: int, keep_ratio: float, metric: str,
          values: Sequence[float], seeds: Sequence[int]) -> dict[str, Any]:
  """One row: `values` are the metric's per-seed values, `seeds` the seeds they came from."""
  mean, half = stats.mean_ci95(values)
  return {"experiment": experiment, "method": method, "rank": rank, "keep_ratio": keep_ratio,
          "metric": metric, "mean": mean, "ci95": None if math.isnan(half) else half,
          "n_seeds": len(values), "seeds": list(seeds), "command": command()}


def update(path: str, experiment: str, records: list[dict[str, Any]]) -> None:
  """Writes `records` as `experiment`'s claims in the JSON list at `path`."""
  kept = []
  if os.path.exists(path):
    try:
      with open(path) as f:
        kept = [r for r in json.load(f) if r["experiment"] != experiment]
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise errors.UserError(f"{path} is not a readable claims list ({e}); move it aside and "
                             "rerun to write a new one") from None
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump(kept + records, f, indent=1)
