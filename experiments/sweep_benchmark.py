r"""Benchmark: S settings as one vmapped sweep vs the same S settings run one after another.

Both arms run the same config (`--config`, SOFT + OSFA by default) for the same rounds, with a
`sweep.zeta` list of S values: arm 1 is one `experiment.run` of the sweep (one compilation,
S members vmapped); arm 2 is `experiment.run` of each member config in turn (S compilations).
Wall time counts everything a user waits for (setup, compilation, rounds, the final
evaluation); the ratio is separate / sweep, measured in one process on one machine.

  python -m experiments.sweep_benchmark --config=configs/tsfa.py:controller=osfa,scale=cpu \
      --settings=4 --rounds=10 --out=/tmp/sweep_bench.json
"""

import os
import tempfile
import time

from absl import flags

from experiments import common
from softjax import config as config_lib
from softjax.config import sweep
from softjax.run import experiment

_CONFIG = flags.DEFINE_string("config", "configs/tsfa.py:controller=osfa,scale=cpu",
                              "Launcher spec of the base config.")
_SETTINGS = flags.DEFINE_integer("settings", 4, "S, the number of zeta values.")
_ROUNDS = flags.DEFINE_integer("rounds", 10, "Rounds per run.")
_OUT = flags.DEFINE_string("out", None, "Write the record as JSON here.")


def _base(rounds: int, settings: int):
  config = config_lib.load(_CONFIG.value).unlock()
  config.fl.rounds = rounds
  config.eval.every = rounds  # one evaluation, at the end
  config.checkpoint.every = rounds
  config.sweep.zeta = ",".join(str(0.05 * i) for i in range(settings))
  config.lock()
  return config


def measure(rounds: int, settings: int) -> dict:
  config = _base(rounds, settings)
  with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    swept = experiment.run(config, os.path.join(tmp, "sweep"))
    sweep_s = time.perf_counter() - start
    start = time.perf_counter()
    alone = [experiment.run(member, os.path.join(tmp, f"alone{i}"))
             for i, member in enumerate(sweep.member_configs(config))]
    separate_s = time.perf_counter() - start
  return {"config": _CONFIG.value, "settings": settings, "rounds": rounds,
          "sweep_wall_s": sweep_s, "separate_wall_s": separate_s,
          "separate_over_sweep": separate_s / sweep_s,
          "sweep_traces": swept["round_traces"],
          "separate_traces": sum(a["round_traces"] for a in alone)}


def main(argv):
  del argv
  common.quiet_libraries()
  record = common.exit_on_user_error(measure, _ROUNDS.value, _SETTINGS.value)
  print(f"S = {record['settings']}, {record['rounds']} rounds: one vmapped sweep "
        f"{record['sweep_wall_s']:.1f} s ({record['sweep_traces']} compilation) vs separate runs "
        f"{record['separate_wall_s']:.1f} s ({record['separate_traces']} compilations): "
        f"separate / sweep = {record['separate_over_sweep']:.2f}x")
  common.write_json(_OUT.value, record)


if __name__ == "__main__":
  common.run_launcher(main)
