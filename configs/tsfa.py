r"""SOFT under a latency budget (ALGORITHM.md 4-7): TSFA, OSFA, or fixed O on an equal split.

One run; `python -m experiments.reproduce --experiment=e2` (TSFA vs OSFA over ranks) and
`--experiment=e4` (bits to a target accuracy, SOFT+TSFA vs dense) run sets of them.

  python -m experiments.run --config=configs/tsfa.py --workdir=workdirs/tsfa
  python -m experiments.run --config=configs/tsfa.py:controller=osfa,rank=16 --workdir=/tmp/o16

The budget Tbar is `budget_fraction` x the expected latency of a dense rank-8 upload (mean
channel, equal split), the same for every rank and controller so that runs compare.

Arguments (`configs/tsfa.py:controller=osfa,rank=4,scale=cpu,budget_fraction=0.5,V=1.0`):
  controller: tsfa (rank chosen offline) | osfa (fixed rank, online stage) | fixed (O, equal
    split) | dense (dense uploads, no latency control: the "ideal" baseline).
  method: the sparsifier under the controller (soft, tlora, rlora, slora).
  rank: the LoRA rank for osfa / fixed (tsfa chooses its own from rank_candidates).
  keep_ratio: O for controller=fixed.
  scale: one of configs/scales.py's SCALES (cpu, cpu_k10, cpu_k10_b16, cpu_v1, paper, test).
  budget_fraction: Tbar / dense reference latency.
  V: Lyapunov weight.
  spectrum: power_law | pilot (tsfa's offline spectrum model).
  sparsification_cost: dropped | in_flight (how tsfa's J(r) prices dropped components).
  solver: cvx | numpy.
  rounds: 0 keeps the scale's default.
  eval_every: 0 keeps the scale's default.
  checkpoint: the ViT-B/16 .npz for scale=paper.
"""

from configs import scales
from softjax import config as config_lib

REFERENCE_RANK = 8  # the dense upload that Tbar is a fraction of


def get_config(arg=None):
  args = config_lib.parse_arg(
      arg, controller="tsfa", method="soft", rank=8, keep_ratio=0.5, scale="cpu",
      budget_fraction=0.5, V=1.0, spectrum="power_law", sparsification_cost="dropped",
      solver="cvx", rounds=0, eval_every=0,
      checkpoint="ViT-B_16.npz")
  config = scales.base_for_scale(args.scale, args.checkpoint)
  dense = args.controller == "dense"
  config.lora.rank = args.rank
  # The same adapter scale alpha / r at every rank (E1's choice); tsfa keeps it at its own rank.
  config.lora.alpha = 4.0 * args.rank
  config.method.name = "dense" if dense else args.method
  scales.set_orthogonality(config)
  config.method.keep_ratio = 1.0 if dense else args.keep_ratio
  config.controller.name = "fixed" if dense else args.controller
  config.controller.V = args.V
  config.controller.solver = args.solver
  config.controller.spectrum = args.spectrum
  config.controller.sparsification_cost = args.sparsification_cost
  config.wireless.budget_fraction = args.budget_fraction
  config.wireless.reference_rank = REFERENCE_RANK
  if args.rounds:
    config.fl.rounds = args.rounds
  if args.eval_every:
    config.eval.every = args.eval_every
  config.lock()
  return config
