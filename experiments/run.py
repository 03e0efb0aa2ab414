r"""Launches (or resumes) a federated experiment from a config file.

  python -m experiments.run --config=configs/quickstart.py --workdir=workdirs/quickstart
  python -m experiments.run --config=configs/testing.py:rounds=2 --workdir=/tmp/t \
      --config.fl.num_clients=8

Running the same command again on the same workdir resumes from its newest checkpoint.
"""

from absl import app, flags
from ml_collections import config_flags

from experiments import common
from softjax.run import experiment

_CONFIG = config_flags.DEFINE_config_file("config", None, "A config file in configs/.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (resumed if it has a checkpoint).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.quiet_libraries()
  common.exit_on_user_error(experiment.run, _CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  common.run_launcher(main)
