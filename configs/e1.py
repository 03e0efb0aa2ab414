r"""Experiment E1 (ALGORITHM.md 8): SOFT vs TLoRA / RLoRA / SLoRA vs dense, fixed keep ratio.

One run of the comparison; `python -m experiments.reproduce --experiment=e1` runs them all.

  python -m experiments.run --config=configs/e1.py:method=soft,rank=8 --workdir=/tmp/e1_soft8

Arguments (`configs/e1.py:method=tlora,rank=4,scale=cpu,rounds=60`):
  method: dense | soft | tlora | rlora | slora.
  rank: LoRA rank.
  scale: one of configs/scales.py's SCALES: cpu (the quickstart setup), cpu_k10, cpu_k10_b16,
    cpu_v1, paper (ViT-B/16, CIFAR-100; an accelerator), or test.
  keep_ratio: O for the sparsified methods (dense always sends everything).
  zeta: SOFT's orthogonality weight (the baselines train without the penalty); SOFT's server
    also re-orthogonalizes its factors every round (configs/scales.py: set_orthogonality).
  rounds: 0 keeps the scale's default.
  checkpoint: the ViT-B/16 .npz for scale=paper.
"""

from configs import scales
from softjax import config as config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, method="soft", rank=8, scale="cpu", keep_ratio=0.5,
                              zeta=scales.SOFT_ZETA, rounds=0, checkpoint="ViT-B_16.npz")
  config = scales.base_for_scale(args.scale, args.checkpoint)
  config.lora.rank = args.rank
  config.lora.alpha = 4.0 * args.rank  # the same adapter scale alpha / r = 4 at every rank
  config.method.name = args.method
  config.method.keep_ratio = 1.0 if args.method == "dense" else args.keep_ratio
  scales.set_orthogonality(config, args.zeta)
  if args.rounds:
    config.fl.rounds = args.rounds
  config.lock()
  return config
