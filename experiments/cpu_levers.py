r"""CPU speed levers of the benchmark round, each in a fresh process, against the default.

Each arm times experiments/round_timing.time_jax_round at a benchmark scale in a subprocess
with its own XLA_FLAGS and client_parallelism (XLA reads its flags once per process). The arms
run in a fixed order, twice (A B C ... A B C ...) so that drift of the machine's
speed shows up as a difference between the two passes, and each arm reports the median of its
rounds over both passes. The figure to read is the ratio to the default arm of the same run.

  python -m experiments.cpu_levers --scale=cpu --out=results/levers.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from absl import flags

from experiments import common, round_timing

_SCALE = flags.DEFINE_enum("scale", "cpu", ["test", "cpu", "gpu"], "Problem size.")
_PASSES = flags.DEFINE_integer("passes", 2, "Times each arm runs, interleaved with the others.")
_OUT = flags.DEFINE_string("out", None, "Write the record as JSON here.")
_ARMS = flags.DEFINE_list("arms", [], "The levers to time beside the default (default: all).")
_CHILD = flags.DEFINE_string("child", None, "Internal: time one arm (its parallelism).")


def _child(parallelism: int) -> None:
  scale = round_timing.SCALES[_SCALE.value]
  record = round_timing.time_jax_round(scale, parallelism=parallelism or scale.clients)
  print(json.dumps({"round_s_all": record["round_s_all"], "first_call_s": record["first_call_s"]}))


def _time_arm(xla_flags: str, parallelism: int) -> dict:
  env = {**os.environ, "XLA_FLAGS": xla_flags}
  done = subprocess.run([sys.executable, "-m", "experiments.cpu_levers",
                         f"--scale={_SCALE.value}", f"--child={parallelism}"],
                        env=env, capture_output=True, text=True, check=False)
  if done.returncode != 0:
    raise RuntimeError(f"arm with XLA_FLAGS={xla_flags!r} failed:\n{done.stderr[-2000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def measure() -> dict:
  timed = round_timing.chosen_levers(_ARMS.value)
  runs = {name: [] for name in timed}
  for _ in range(_PASSES.value):
    for name, (xla_flags, parallelism) in timed.items():
      runs[name].append(_time_arm(xla_flags, parallelism))
  arms = {}
  for name, passes in runs.items():
    rounds = [t for p in passes for t in p["round_s_all"]]
    arms[name] = {"xla_flags": timed[name][0], "parallelism": timed[name][1],
                  "round_s": round_timing.median(rounds),
                  "pass_medians": [round_timing.median(p["round_s_all"]) for p in passes]}
  base = arms["default"]["round_s"]
  for arm in arms.values():
    arm["speedup_vs_default"] = base / arm["round_s"]
  return {"scale": _SCALE.value, "arms": arms, **round_timing.machine()}


def markdown(record: dict) -> str:
  lines = [f"Machine: {round_timing.cpu_name(record)}, flags {', '.join(record['cpu_flags'])}, "
           f"jaxlib {record['jaxlib_version']}; scale {record['scale']}.", "",
           "| arm | XLA_FLAGS | client_parallelism | round (s) | per pass | vs default |",
           "|---|---|---:|---:|---|---:|"]
  for name, a in record["arms"].items():
    passes = " / ".join(f"{p:.3f}" for p in a["pass_medians"])
    lines.append(f"| {name} | `{a['xla_flags'] or '-'}` | {a['parallelism'] or 'K'} | "
                 f"{a['round_s']:.3f} | {passes} | {a['speedup_vs_default']:.2f}x |")
  return "\n".join(lines)


def main(argv):
  del argv
  common.quiet_libraries()
  if _CHILD.value is not None:
    _child(int(_CHILD.value))
    return
  record = common.exit_on_user_error(measure)
  print(markdown(record))
  if _OUT.value:
    common.write_json(_OUT.value, record)


if __name__ == "__main__":
  common.run_launcher(main)
