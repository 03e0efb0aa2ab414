r"""A tiny run for tests and smoke checks: 8x8 digits, a 2-block ViT, seconds on a CPU.

  python -m experiments.run --config=configs/testing.py --workdir=/tmp/softjax_testing

Arguments (`configs/testing.py:rounds=3`):
  rounds: number of federated rounds.
"""

from softjax import config as config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, rounds=4)
  config = config_lib.base_config()
  config.data.name = "digits"
  config.data.pretrain_fraction = 0.3
  config.model.variant = "tiny"
  config.pretrain.num_classes = 5
  config.pretrain.steps = 40
  config.pretrain.batch_size = 32
  config.lora.rank = 4
  config.fl.num_clients = 6
  config.fl.clients_per_round = 3
  config.fl.rounds = args.rounds
  config.fl.local_steps = 3
  config.fl.batch_size = 8
  config.fl.client_lr = 0.1
  config.fl.lr_schedule = "constant"  # so tests can extend a finished run
  config.eval.every = 2
  config.eval.batch_size = 128
  config.checkpoint.every = 2
  config.lock()
  return config
