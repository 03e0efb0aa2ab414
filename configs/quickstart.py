r"""CPU-scale benchmark task (the quickstart): LoRA adaptation of a weakly pretrained small ViT to
non-IID Fashion-MNIST, on which the adapter, not the head, decides the accuracy.

The backbone (cpu_fast: patch 7, width 128, depth 4) is pretrained centrally on two classes only
(T-shirt/top, trouser) of the half of the training images no client holds, so its frozen features
do not already separate the ten classes: head-only fine-tuning stays far below LoRA
(docs/results.md gives the measured gap and how this task was chosen). 20 clients hold the other
half, two label shards each; 5 clients per round train rank-8 LoRA on query/value and the head for
5 local SGD steps (batch 32, learning rate 0.1 decaying by cosine to 0.01 over 80 rounds).
Intermediate evaluations read the first 2,000 test images; the last round also reads all 10,000.

  python -m experiments.run --config=configs/quickstart.py --workdir=workdirs/quickstart

Arguments (`configs/quickstart.py:rounds=10,head_only`):
  rounds: number of federated rounds.
  clients: K, the clients sampled per round (5; 10 is the lower-variance task, scale cpu_k10).
  batch: the clients' batch size b (32; 16 with clients=10 is scale cpu_k10_b16).
  head_only: train only the classifier head (the reference LoRA must beat).
  centralized: one client holding all the federated data (IID), trained for K x E = 25 local
    steps a round: the same SGD steps and examples as the federated run, without federation.
"""

from softjax import config as config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, rounds=80, clients=5, batch=32, head_only=False,
                              centralized=False)
  config = config_lib.base_config()
  config.data.name = "fashion_mnist"
  config.model.variant = "cpu_fast"
  config.pretrain.num_classes = 2
  config.fl.rounds = args.rounds
  config.fl.clients_per_round = args.clients
  config.fl.batch_size = args.batch
  config.fl.client_lr = 0.1
  config.eval.num_examples = 2000
  if args.head_only:
    config.lora.targets = ""
  if args.centralized:
    centralize(config)
  config.lock()
  return config


def centralize(config) -> None:
  """One client with every federated example, the round's K x E steps run by it alone."""
  fl = config.fl
  fl.local_steps *= fl.clients_per_round
  fl.num_clients = fl.clients_per_round = 1
  config.data.partition = "iid"
