r"""Is SOFT's premise true? Orthogonality variants of SOFT, each as one vmapped seed sweep.

  python -m experiments.reproduce --experiment=orthogonality \
      --out=docs/results/orthogonality --workdirs=/tmp/softjax_orth --seeds=0,1,2,3,4

Every variant is configs/e1.py (SOFT, rank 8, O = 0.5, fixed controller, the CPU scale) with
the penalty and the server step of ALGORITHM.md 2.1 set as below, and its seeds run as one
vmapped sweep in `WORKDIRS/<variant>` (resumed where it stopped). When a variant finishes,
its per-seed summary is written to `OUT/<variant>.json` (small: commit it), and a variant
whose summary exists is not run again. `OUT/orthogonality.md` tabulates every finished
variant: mean and Student-t 95 % half-width over the seeds of
  - final accuracy (mean of the last 3 evaluations),
  - the global factors' orthogonality residuals for B and for A,
  - the relative gap between SOFT's scores and the true singular values of what clients score,
  - the share of the score energy a client drops each round,
each of the last three averaged over the last 20 rounds.
"""

from __future__ import annotations

import json
import os
from typing import Any

from configs import e1 as e1_config
from experiments import stats
from softjax import errors
from softjax.run import experiment

# variant -> (method.penalty, method.zeta, method.reorthogonalize)
VARIANTS: dict[str, tuple[str, float, bool]] = {
    "no_penalty": ("offdiag", 0.0, False),
    "offdiag": ("offdiag", 0.1, False),  # the default before this study
    "normalized": ("normalized", 0.1, False),
    "reorth": ("offdiag", 0.0, True),
    "reorth_offdiag": ("offdiag", 0.1, True),
}
TAIL_ROUNDS = 20

def variant_config(name: str, seeds: list[int], scale: str, rounds: int):
  penalty, zeta, reorth = VARIANTS[name]
  config = e1_config.get_config(f"method=soft,rank=8,scale={scale},zeta={zeta},rounds={rounds}")
  config.unlock()
  config.method.penalty = penalty
  config.method.reorthogonalize = reorth
  if len(seeds) > 1:
    config.sweep.seed = ",".join(map(str, seeds))
  else:
    config.seed = seeds[0]
  config.lock()
  return config


def _tail_mean(rows: list[dict[str, Any]], value) -> float:
  tail = rows[-TAIL_ROUNDS:]
  return sum(value(r) for r in tail) / len(tail)


def member_record(rows: list[dict[str, Any]]) -> dict[str, float]:
  """One seed's measurements (the quantities of the module docstring)."""
  return {
      "final_accuracy": stats.final_accuracy(rows),
      "orth_residual_B": _tail_mean(rows, lambda r: r["orth_residual_B"]),
      "orth_residual_A": _tail_mean(rows, lambda r: r["orth_residual_A"]),
      "score_gap": _tail_mean(rows, lambda r: r["score_gap"]),
      "dropped_share": _tail_mean(
          rows, lambda r: r["dropped_energy"] / r["score_energy"] if r["score_energy"] else 0.0),
  }


def _variant_fields(name: str) -> dict[str, Any]:
  penalty, zeta, reorth = VARIANTS[name]
  return {"variant": name, "penalty": penalty, "zeta": zeta, "reorthogonalize": reorth}


def run_variant(name: str, seeds: list[int], scale: str, rounds: int, workdirs: str) -> dict:
  summary = experiment.run(variant_config(name, seeds, scale, rounds),
                           os.path.join(workdirs, name))
  members = summary.get("members") or [dict(summary, setting={"seed": seeds[0]})]
  return {**_variant_fields(name), "seeds": [m["setting"]["seed"] for m in members],
          "per_seed": [member_record(m["rows"]) for m in members],
          "wall_time_s": summary["wall_time_s"]}


METRICS = ("final_accuracy", "orth_residual_B", "orth_residual_A", "score_gap", "dropped_share")


def table(records: list[dict]) -> str:
  head = "| variant | penalty | zeta | re-orth | seeds | " + " | ".join(METRICS) + " |"
  lines = [head, "|" + "---|" * (5 + len(METRICS))]
  for r in records:
    cells = ["diverged"] * len(METRICS) if "diverged" in r else [
        "{:.4f} ± {:.4f}".format(*stats.mean_ci95([s[key] for s in r["per_seed"]]))
        for key in METRICS]
    lines.append(f"| {r['variant']} | {r['penalty']} | {r['zeta']:g} | "
                 f"{'yes' if r['reorthogonalize'] else 'no'} | {len(r['seeds'])} | "
                 + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def run_all(out: str, workdirs: str, seeds: list[int], variants: list[str], scale: str,
            rounds: int) -> str:
  os.makedirs(out, exist_ok=True)
  records = []
  for name in variants:
    path = os.path.join(out, f"{name}.json")
    if os.path.exists(path):
      with open(path) as f:
        records.append(json.load(f))
      continue
    try:
      record = run_variant(name, seeds, scale, rounds, workdirs)
    except errors.NonFiniteLossError as e:  # a measured outcome too: recorded, not retried
      record = {**_variant_fields(name), "seeds": seeds, "diverged": str(e)}
    with open(path, "w") as f:
      json.dump(record, f, indent=1)
    records.append(record)
  text = table(records)
  with open(os.path.join(out, "orthogonality.md"), "w") as f:
    f.write(text)
  return text
