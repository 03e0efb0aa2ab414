r"""Paper scale, for a GPU or TPU: ViT-B/16 on CIFAR-100, 100 clients, 10 per round.

Needs (no network is used at run time):
  * a ViT-B/16 checkpoint in the standard .npz layout (for example an ImageNet-21k AugReg
    checkpoint of google-research/vision_transformer), passed as `checkpoint=PATH`;
  * CIFAR-100 prepared as a TFDS data dir: `pip install -e ".[tfds-prepare]"` then
    `tfds build cifar100 --data_dir=DIR`, passed as `--config.data.data_dir=DIR`.
Images are resized on the device from 32x32 to 224x224 (data.image_size), and the
checkpoint's position embeddings are resized to the 14x14 patch grid if they differ.

  python -m experiments.run \
      --config=configs/cifar100_vitb16.py:checkpoint=/path/ViT-B_16.npz \
      --config.data.data_dir=/path/tfds --workdir=workdirs/cifar100

Arguments (`configs/cifar100_vitb16.py:checkpoint=PATH,rounds=100,parallelism=10`):
  checkpoint: the ViT-B/16 .npz file.
  rounds: number of federated rounds.
  parallelism: clients trained at once (10 = all sampled clients vmapped).
"""

from softjax import config as config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, checkpoint="ViT-B_16.npz", rounds=100, parallelism=10)
  config = config_lib.base_config()
  config.data.name = "cifar100"
  config.data.image_size = 224
  config.data.pretrain_fraction = 0.0  # the backbone is pretrained elsewhere: use every image
  config.data.partition = "shards"
  config.data.shards_per_client = 2
  config.model.variant = "B/16"
  config.model.backbone = args.checkpoint
  config.lora.rank = 8
  config.lora.alpha = 16.0  # scale 2: not tuned (no accelerator run yet)
  config.fl.num_clients = 100
  config.fl.clients_per_round = 10
  config.fl.rounds = args.rounds
  config.fl.local_steps = 10
  config.fl.batch_size = 32
  config.fl.client_optimizer = "sgd"
  config.fl.client_lr = 0.05
  config.fl.lr_schedule = "cosine"
  config.fl.client_parallelism = args.parallelism
  # ~35 GFLOP per 224x224 training example, 320 a round: 20-60 TFLOP/s devices compute for
  # 0.2-0.6 s next to ~1 s for a dense rank-8 upload on a 2 MHz share of the 20 MHz band.
  config.wireless.device_gflops_min = 20000.0
  config.wireless.device_gflops_max = 60000.0
  config.eval.every = 10
  config.eval.batch_size = 250
  config.checkpoint.every = 10
  config.lock()
  return config
