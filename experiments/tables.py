"""Table and claim helpers the experiment drivers share: per-seed values, mean ± Student-t
95 % half-width cells, markdown tables, accuracy at a given uplink and the first evaluation
reaching a target, and summary.json records of a table row."""

from __future__ import annotations

import math
from typing import Any

from experiments import claims, seeded, stats


def per_seed(record: dict[str, Any], keys) -> dict[str, list]:
  """{key: the record's per-seed values}, uplink in MB."""
  out = {key: seeded.values(record, key) for key in keys}
  out["uplink_mb"] = [b / 8e6 for b in seeded.values(record, "cum_uplink_bits")]
  return out


def row_claims(experiment_name: str, row: dict[str, Any], metrics, method: str,
                rank=None, keep_ratio=None, names=None) -> list[dict[str, Any]]:
  """summary.json records of one row: each metric (renamed by `names`) over the seeds that
  have a value."""
  out = []
  for metric in metrics:
    pairs = [(v, s) for v, s in zip(row[metric] or [], row["seeds"]) if v is not None]
    if pairs:
      out.append(claims.claim(experiment_name, method, rank, keep_ratio,
                              (names or {}).get(metric, metric), [v for v, _ in pairs],
                              [s for _, s in pairs]))
  return out


def accuracy_at_bits(curve: dict[str, list], bits: float) -> float | None:
  """Test accuracy of the last evaluation whose cumulative uplink is at most `bits`."""
  reached = [a for a, b in zip(curve["test_accuracy"], curve["cum_uplink_bits"]) if b <= bits]
  return reached[-1] if reached else None


def mean(xs) -> float:
  return sum(xs) / len(xs)


def ci(values, fmt: str = ".4f") -> str:
  """'mean ± half-width' of the values that are there ('k/n' appended when some are not)."""
  if values is None:
    return "-"
  got = [v for v in values if v is not None]
  if not got:
    return f"none of {len(values)}"
  mean, half = stats.mean_ci95(got)
  text = format(mean, fmt) + ("" if math.isnan(half) else
                              " ± " + format(half, fmt.replace("+", "")))
  return text if len(got) == len(values) else f"{text} ({len(got)}/{len(values)})"


def ci_col(header: str, key: str, fmt: str = ".4f"):
  """A table column: the row's per-seed `key` as mean ± 95 % half-width."""
  return header, lambda r: ci(r[key], fmt)


def markdown_table(columns, records) -> str:
  """A markdown table: `columns` are (header, format function of a record); numbers right."""
  head = "| " + " | ".join(h for h, _ in columns) + " |"
  rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|"
  body = ["| " + " | ".join(fn(r) for _, fn in columns) + " |" for r in records]
  return "\n".join([head, rule] + body) + "\n"


def num(key: str, fmt: str):
  return lambda r: "-" if r[key] is None else format(r[key], fmt)


def first_reaching(curve: dict[str, list], target: float) -> tuple[int | None, int | None]:
  """(round, cumulative uplink bits) of the first evaluation at or above `target`."""
  for t, acc, bits in zip(curve["round"], curve["test_accuracy"], curve["cum_uplink_bits"]):
    if acc >= target:
      return t, bits
  return None, None
