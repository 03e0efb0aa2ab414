"""The three sizes every experiment config comes in (shared by configs/e1.py and configs/tsfa.py).

  cpu:    the quickstart, the CPU-scale benchmark task (cpu_fast ViT pretrained on 2 classes,
          Fashion-MNIST, 20 clients): minutes on a CPU.
  cpu_k10: the same task with K = 10 clients a round instead of 5 (lower seed-to-seed spread,
          about twice the round time): the candidate benchmark task of issue 11.
  cpu_k10_b16: K = 10 clients a round, each at batch 16 instead of 32: about cpu_k10's spread
          at about cpu's cost (at rank 8; docs/results.md).
  cpu_v1: the first CPU-scale task (configs/cpu_v1.py), on which the older results were measured.
  paper: ViT-B/16 on CIFAR-100, 100 clients (configs/cifar100_vitb16.py): an accelerator.
  test:  8x8 digits and a 2-block ViT (configs/testing.py): seconds, for tests.
"""

from configs import cifar100_vitb16, cpu_v1, quickstart, testing
from softjax import config as config_lib

SCALES = ("cpu", "cpu_k10", "cpu_k10_b16", "cpu_v1", "paper", "test")
SOFT_ZETA = 0.1  # SOFT's penalty weight in the experiment configs


def set_orthogonality(config, zeta: float = SOFT_ZETA) -> None:
  """SOFT's orthogonality defaults [choice, docs/algorithm.md 0]: the off-diagonal penalty at
  weight `zeta` AND the server's re-orthogonalization after every aggregation; the other
  methods train without the penalty and keep their factors as aggregated."""
  soft = config.method.name == "soft"
  config.method.zeta = zeta if soft else 0.0
  config.method.reorthogonalize = soft


def base_for_scale(scale: str, checkpoint: str):
  """An unlocked config of the given scale; `checkpoint` is the ViT-B/16 .npz for paper."""
  if scale == "cpu":
    config = quickstart.get_config()
  elif scale == "cpu_k10":
    config = quickstart.get_config("clients=10")
  elif scale == "cpu_k10_b16":
    config = quickstart.get_config("clients=10,batch=16")
  elif scale == "cpu_v1":
    config = cpu_v1.get_config()
  elif scale == "paper":
    config = cifar100_vitb16.get_config(f"checkpoint={checkpoint}")
  elif scale == "test":
    config = testing.get_config()
  else:
    raise config_lib.ConfigError("<arg>.scale", scale, f"must be one of {', '.join(SCALES)}")
  return config.unlock()
