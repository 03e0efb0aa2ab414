r"""Is SOFT's premise true? Orthogonality variants of SOFT, each as one vmapped seed sweep.

  python -m experiments.reproduce --experiment=orthogonality --out=docs/results/orthogonality \
      --runs=docs/results/runs --workdirs=/tmp/softjax_runs --seeds=0,1,2,3,4

Every variant is configs/e1.py (SOFT, rank 8, O = 0.5, fixed controller, the CPU scale) with
the penalty and the server step of ALGORITHM.md 2.1 set as below, run as the seeded run
`soft_r8_<variant>` (experiments/seeded.py: its summary in RUNS, shared with E1's SOFT rows;
a finished run is read, not repeated). `OUT/orthogonality.md` tabulates every variant: mean and
Student-t 95 % half-width over the seeds of
  - final accuracy (mean of the last 3 evaluations),
  - the global factors' orthogonality residuals for B and for A,
  - the relative gap between SOFT's scores and the true singular values of what clients score,
  - the share of the score energy a client drops each round,
each of the last four averaged over the last 20 rounds.
"""

from __future__ import annotations

import os
from typing import Any

from configs import e1 as e1_config
from experiments import seeded, stats

# variant -> (method.penalty, method.zeta, method.reorthogonalize)
VARIANTS: dict[str, tuple[str, float, bool]] = {
    "no_penalty": ("offdiag", 0.0, False),
    "offdiag": ("offdiag", 0.1, False),  # the default before this study
    "normalized": ("normalized", 0.1, False),
    "reorth": ("offdiag", 0.0, True),
    "reorth_offdiag": ("offdiag", 0.1, True),  # the default since (configs/scales.py)
}


def variant_config(name: str, scale: str, rounds: int, rank: int = 8):
  penalty, zeta, reorth = VARIANTS[name]
  config = e1_config.get_config(
      f"method=soft,rank={rank},scale={scale},zeta={zeta},rounds={rounds}")
  config.unlock()
  config.method.penalty = penalty
  config.method.reorthogonalize = reorth
  return config.lock()


def variant_fields(name: str) -> dict[str, Any]:
  """What identifies a variant in its run's record."""
  penalty, zeta, reorth = VARIANTS[name]
  return {"variant": name, "penalty": penalty, "zeta": zeta, "reorthogonalize": reorth}


def run_variant(name: str, seeds: list[int], scale: str, rounds: int, runs_dir: str,
                workdirs: str, rank: int = 8) -> dict[str, Any]:
  """The seeded run `soft_r<rank>_<name>` (configs/e1.py at `rank` with the variant's fields)."""
  config = variant_config(name, scale, rounds, rank)
  fields = {"method": "soft", "rank": rank, "keep_ratio": config.method.keep_ratio,
            **variant_fields(name)}
  return seeded.run(f"soft_r{rank}_{name}", config, seeds, runs_dir, workdirs, fields)


METRICS = ("final_accuracy",) + seeded.SOFT_DIAGNOSTICS


BASELINE = "no_penalty"  # the paired accuracy difference is taken against this variant


def _paired_delta(record: dict, base: dict | None) -> str:
  """Accuracy minus the baseline's on the same seeds (same init and client draws)."""
  if base is None or "diverged" in base or base["seeds"] != record["seeds"]:
    return "-"
  deltas = [a - b for a, b in zip(seeded.values(record, "final_accuracy"),
                                  seeded.values(base, "final_accuracy"))]
  return "{:+.4f} ± {:.4f}".format(*stats.mean_ci95(deltas))


def table(records: list[dict]) -> str:
  """Mean ± 95 % half-width per variant, and its accuracy paired against BASELINE's."""
  base = next((r for r in records if r["variant"] == BASELINE), None)
  head = ("| variant | penalty | zeta | re-orth | seeds | " + " | ".join(METRICS)
          + f" | accuracy - {BASELINE} (paired) |")
  lines = [head, "|" + "---|" * (6 + len(METRICS))]
  for r in records:
    cells = ["diverged"] * (len(METRICS) + 1) if "diverged" in r else [
        "{:.4f} ± {:.4f}".format(*seeded.interval(r, key)) for key in METRICS] + [
        _paired_delta(r, base)]
    lines.append(f"| {r['variant']} | {r['penalty']} | {r['zeta']:g} | "
                 f"{'yes' if r['reorthogonalize'] else 'no'} | {len(r['seeds'])} | "
                 + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def run_all(out: str, runs_dir: str, workdirs: str, seeds: list[int], variants: list[str],
            scale: str, rounds: int) -> str:
  """Runs (or reads) every variant in order and writes OUT/orthogonality.md."""
  records = [run_variant(name, seeds, scale, rounds, runs_dir, workdirs) for name in variants]
  text = table(records)
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "orthogonality.md"), "w") as f:
    f.write(text)
  return text
