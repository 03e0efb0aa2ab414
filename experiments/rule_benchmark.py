"""The `rules` section of experiments/benchmark.py: E7's round time per aggregation rule, every
rule on one machine in one process.

E7's round column comes from seeded sweeps that ran on different days, machines and loads, so
its ratios between rules are not comparable. Here every rule's E7 configuration (one seed, rank
8, dense uploads, fixed controller; SOFT at O = 0.5) runs `experiment.run` with a random
backbone (the time does not depend on the weights), evaluation only at the end on a small
subset, and no checkpoint in between. Arms are interleaved over passes, so a drift of the
machine's speed reaches every arm alike. Reported per arm: the median round time over every pass
(round 1 of a run holds the compilation and is left out), each pass's median, and the ratio to
FedIT's round.
"""

from __future__ import annotations

import statistics
import tempfile

# The benchmark's scale -> the config scale the E7 configurations are built at.
CONFIG_SCALE = {"test": "test", "cpu": "cpu", "gpu": "cpu"}
EVAL_EXAMPLES = 200
BASELINE = "fedit"


def arms(chosen=None) -> tuple[str, ...]:
  """Every rule and SOFT, or FedIT (the baseline) and the `chosen` ones, in that order."""
  from experiments import common, e7
  from softjax.config import choices
  every = (*choices.AGGREGATION_RULES, e7.SOFT_ARM)
  if chosen is None:
    return every
  chosen = common.chosen_names("rules", chosen, every)
  return tuple(a for a in every if a == BASELINE or a in chosen)


def timing_config(arm: str, config_scale: str, rounds: int):
  """E7's configuration of `arm` for timing: random backbone, one evaluation at the end."""
  from experiments import e7

  config = e7.arm_config(arm, config_scale, rounds, "unused.npz").unlock()
  config.model.backbone = "random"
  config.eval.every = config.checkpoint.every = rounds
  config.eval.num_examples = EVAL_EXAMPLES
  config.eval.final_full = False
  return config.lock()


def section_rules(scale_name: str, rounds: int, passes: int = 2, chosen=None) -> dict:
  """Per arm (`arms(chosen)`) the round's median over `passes` interleaved runs of `rounds`
  rounds each."""
  from softjax.run import experiment

  if rounds < 2:
    raise SystemExit("error: the rules section needs --rounds >= 2 (round 1 compiles)")
  timed = arms(chosen)
  times = {arm: [] for arm in timed}
  traces = {arm: [] for arm in timed}
  for _ in range(passes):
    for arm in timed:
      config = timing_config(arm, CONFIG_SCALE[scale_name], rounds)
      with tempfile.TemporaryDirectory() as tmp:
        summary = experiment.run(config, tmp)
      times[arm].append([r["round_time_s"] for r in summary["rows"][1:]])
      traces[arm].append(summary["round_traces"])
  base = statistics.median(t for run in times[BASELINE] for t in run)
  out = []
  for arm in timed:
    median = statistics.median(t for run in times[arm] for t in run)
    out.append({"arm": arm, "round_s": median, "over_fedit": median / base,
                "per_pass_s": [statistics.median(run) for run in times[arm]],
                "round_traces": traces[arm]})
  return {"config_scale": CONFIG_SCALE[scale_name], "rounds": rounds, "passes": passes,
          "eval_examples": EVAL_EXAMPLES, "arms": out}


def paired_ratios(record: dict) -> dict[str, list[float]]:
  """Per arm its pass medians over FedIT's in the same pass: pairing by pass cancels a drift
  of the machine's speed between passes."""
  base = next(a["per_pass_s"] for a in record["arms"] if a["arm"] == BASELINE)
  return {a["arm"]: [t / b for t, b in zip(a["per_pass_s"], base)] for a in record["arms"]}


def markdown(record: dict) -> list[str]:
  from experiments.tables import ci

  paired = paired_ratios(record)
  lines = [f"E7's round per rule (`{record['config_scale']}` scale, one seed, rank 8, random "
           f"backbone; median of rounds 2-{record['rounds']} over {record['passes']} "
           f"interleaved passes; paired: each pass's median over FedIT's in that pass, mean ± "
           f"Student-t 95 % half-width over the passes):", "",
           "| rule | round (s) | per pass (s) | vs FedIT | vs FedIT, paired by pass |",
           "|---|---:|---|---:|---:|"]
  lines += [f"| {a['arm']} | {a['round_s']:.3f} | "
            f"{' / '.join(f'{t:.3f}' for t in a['per_pass_s'])} | {a['over_fedit']:.2f}x | "
            f"{ci(paired[a['arm']], '.2f')}x |"
            for a in record["arms"]]
  return lines + [""]
