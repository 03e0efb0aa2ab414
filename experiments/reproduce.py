r"""Reproduction drivers for the experiments of ALGORITHM.md section 8.

  python -m experiments.reproduce --experiment=e1 --scale=cpu --out=results/e1

Each experiment runs its configs through the same `experiment.run` the launcher uses (one
workdir per run under --out, so an interrupted driver resumes every run where it stopped),
then writes `DIR/<exp>.json`, a markdown table `DIR/<exp>.md` and plots `DIR/<exp>_*.png`.
"""

from __future__ import annotations

import json
import os
from typing import Any

from absl import app
from absl import flags

from configs import e1 as e1_config
from experiments import common
from experiments import compression_cost
from softjax import experiment
from softjax import plots

_EXPERIMENT = flags.DEFINE_enum("experiment", None, ["e1"], "Which experiment to run.")
_SCALE = flags.DEFINE_enum("scale", "cpu", ["cpu", "paper", "test"],
                           "cpu: minutes on a CPU; paper: an accelerator; test: seconds.")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_ROUNDS = flags.DEFINE_integer("rounds", 0, "Override the number of rounds (0: the config's).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "ViT-B_16.npz", "ViT-B/16 .npz (scale=paper).")
flags.mark_flags_as_required(["experiment", "out"])

E1_METHODS = ("dense", "soft", "tlora", "rlora", "slora")
E1_RANKS = (4, 8)
E1_KEEP_RATIO = 0.5


def _curve(rows: list[dict[str, Any]]) -> dict[str, list]:
  evaluated = [r for r in rows if "test_accuracy" in r]
  return {"round": [r["round"] for r in evaluated],
          "test_accuracy": [r["test_accuracy"] for r in evaluated],
          "cum_uplink_bits": [r["cum_uplink_bits"] for r in evaluated],
          "cov_term": [r["cov_term"] for r in rows]}


def run_e1(out: str, scale: str, rounds: int, checkpoint: str) -> list[dict[str, Any]]:
  """E1: every method at ranks 4 and 8 with O = 0.5 (dense: O = 1)."""
  records = []
  for rank in E1_RANKS:
    compress_time = {}
    for method in E1_METHODS:
      arg = (f"method={method},rank={rank},scale={scale},keep_ratio={E1_KEEP_RATIO},"
             f"rounds={rounds},checkpoint={checkpoint}")
      config = e1_config.get_config(arg)
      summary = experiment.run(config, os.path.join(out, f"{method}_r{rank}"))
      if not compress_time:
        compress_time = _compression_times(summary["lora_template"], rank)
      records.append({
          "method": method, "rank": rank, "keep_ratio": config.method.keep_ratio,
          "zeta": config.method.zeta, "final_accuracy": summary["final_accuracy"],
          "cum_uplink_bits": summary["cum_uplink_bits"],
          "client_compress_time_s": compress_time.get(method, 0.0),
          "wall_time_s": summary["wall_time_s"], "curve": _curve(summary["rows"])})
  return records


def _compression_times(lora_template, rank: int) -> dict[str, float]:
  """Seconds one client spends compressing its upload, per method, on this run's model."""
  del rank
  import jax  # local: only needed here
  import jax.numpy as jnp

  glob = jax.tree.map(lambda x: 0.01 * jnp.ones(x.shape, x.dtype), lora_template)
  local = jax.tree.map(lambda x: x + 0.01, glob)
  return {m: (compression_cost.time_compress(m, glob, local, E1_KEEP_RATIO, repeats=5)
              if m != "dense" else 0.0) for m in E1_METHODS}


def e1_table(records: list[dict[str, Any]]) -> str:
  lines = ["| method | rank | O | final accuracy | uplink (MB) | client compress (ms) |",
           "|---|---:|---:|---:|---:|---:|"]
  for r in records:
    lines.append(f"| {r['method']} | {r['rank']} | {r['keep_ratio']:.2f} | "
                 f"{r['final_accuracy']:.4f} | {r['cum_uplink_bits'] / 8e6:.2f} | "
                 f"{r['client_compress_time_s'] * 1e3:.3f} |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  common.quiet_libraries()
  out = _OUT.value
  os.makedirs(out, exist_ok=True)
  name = _EXPERIMENT.value
  records = common.exit_on_user_error(run_e1, out, _SCALE.value, _ROUNDS.value,
                                      _CHECKPOINT.value)
  with open(os.path.join(out, f"{name}.json"), "w") as f:
    json.dump(records, f, indent=1)
  table = e1_table(records)
  with open(os.path.join(out, f"{name}.md"), "w") as f:
    f.write(f"# {name.upper()} ({_SCALE.value} scale)\n\n" + table)
  plots.accuracy_curves(records, os.path.join(out, f"{name}_accuracy.png"),
                        title=f"{name.upper()}: keep ratio {E1_KEEP_RATIO}")
  print(table)


if __name__ == "__main__":
  app.run(main)
