r"""The first CPU-scale task (the quickstart until issue 11): LoRA fine-tuning of a small ViT
pretrained on five Fashion-MNIST classes, on non-IID Fashion-MNIST. Its frozen features already
solve most of the task (head-only 0.644 against dense LoRA 0.671 after 80 rounds), so it cannot
separate the upload methods; kept so that the results measured on it can be rerun.

20 clients hold the half of the training images that pretraining never saw, two label shards
each; 5 clients per round train rank-8 LoRA on query/value and the head for 5 local SGD steps
(batch 32, learning rate 0.03 decaying by cosine to 0.003 over 80 rounds). The backbone is
pretrained centrally on classes 0-4 of the other half (made on first use, then cached).

  python -m experiments.run --config=configs/cpu_v1.py --workdir=workdirs/cpu_v1

Arguments (`configs/cpu_v1.py:rounds=10,head_only`):
  rounds: number of federated rounds.
  head_only: train only the classifier head (the baseline LoRA must beat).
"""

from softjax import config as config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, rounds=80, head_only=False)
  config = config_lib.base_config()
  config.data.name = "fashion_mnist"
  config.model.variant = "cpu_small"
  config.fl.rounds = args.rounds
  if args.head_only:
    config.lora.targets = ""
  config.lock()
  return config
