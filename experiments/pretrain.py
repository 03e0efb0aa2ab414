r"""Pretrains the backbone of a config centrally on held-out data and writes a ViT .npz.

The federated run does this by itself on first use (model.backbone=pretrain) and caches the
result; this launcher makes it explicit, or writes it somewhere else:

  python -m experiments.pretrain --config=configs/quickstart.py
  python -m experiments.pretrain --config=configs/quickstart.py --out=/tmp/vit_small.npz

The images used are the `data.pretrain_fraction` of the training split that no federated client
holds, restricted to classes 0..pretrain.num_classes-1.
"""

from absl import flags
from ml_collections import config_flags

from experiments import common
from softjax import config as config_lib
from softjax.data import sources
from softjax.models import backbone

_CONFIG = config_flags.DEFINE_config_file("config", None, "A config file in configs/.",
                                          lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Output .npz; default: the config's cache path.")
flags.mark_flags_as_required(["config"])


def pretrain(config) -> str:
  """Pretrains the config's backbone; returns the path of the .npz written."""
  config_lib.validate(config)
  dataset = sources.load_dataset(config.data.name, config.data.data_dir or None)
  config_lib.validate_against_data(config, num_classes=dataset.num_classes)
  pretrain_idx, _ = sources.pretrain_federated_split(len(dataset.train_labels),
                                                     config.data.pretrain_fraction)
  path = _OUT.value or backbone.cache_path(config, dataset.train_images.shape[1:])
  return backbone.make_pretrained_backbone(config, dataset, pretrain_idx, path)


def main(argv):
  del argv
  common.quiet_libraries()
  print(common.exit_on_user_error(pretrain, _CONFIG.value))


if __name__ == "__main__":
  common.run_launcher(main)
