"""Where the frozen backbone comes from: a ViT .npz checkpoint, a cached self-pretrained one, or
a random init (tests only).

Every path that yields trained weights goes through `models.checkpoint.load_pretrained`, the
same loader that takes a public ViT-B/16 checkpoint, so the self-pretrained CPU backbone
exercises the real loading code.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from absl import logging
import jax
import ml_collections

from softjax.data import sources
from softjax.errors import BackboneError
from softjax.models import checkpoint as ckpt_lib
from softjax.models import lora as lora_lib
from softjax.models import pretraining, vit

PyTree = Any


def cache_path(config: ml_collections.ConfigDict, image_shape: tuple[int, int, int]) -> str:
  """The cached backbone for this data set (native image shape), model size and recipe."""
  recipe = {"data": config.data.name, "variant": config.model.variant,
            "image_shape": list(image_shape), "fraction": config.data.pretrain_fraction,
            "pretrain": config.pretrain.to_dict()}
  digest = hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
  name = f"{config.data.name}-{config.model.variant.replace('/', '')}-{digest}.npz"
  return os.path.join(os.path.expanduser(config.model.cache_dir), name)


def make_pretrained_backbone(config: ml_collections.ConfigDict, dataset: sources.Dataset,
                             pretrain_idx, path: str) -> str:
  """Pretrains the backbone on the held-out split and writes it to `path` as a ViT .npz."""
  chosen = pretraining.pretrain_examples(dataset.train_labels, pretrain_idx,
                                         config.pretrain.num_classes)
  print(f"pretraining a {config.model.variant} backbone on {len(chosen)} held-out images of "
        f"classes 0..{config.pretrain.num_classes - 1} -> {path}", flush=True)
  params = pretraining.pretrain_backbone(config.model.variant, dataset.train_images[chosen],
                                         dataset.train_labels[chosen], config.pretrain)
  ckpt_lib.save_npz(path, params)
  return path


def load_backbone(config: ml_collections.ConfigDict, model: vit.VisionTransformer,
                  dataset: sources.Dataset, pretrain_idx,
                  image_shape: tuple[int, int, int]) -> PyTree:
  """The full params tree (backbone + a freshly reset head) for the federated model.

  `image_shape` is the model's input shape (the data's, or data.image_size when resized).
  """
  init = lora_lib.init_params(model, jax.random.key(config.seed), image_shape)
  kind = config.model.backbone
  if kind == "random":
    logging.warning("model.backbone=random: the backbone is NOT pretrained (for tests only)")
    return init
  if kind != "pretrain":
    return ckpt_lib.load_pretrained(os.path.expanduser(kind), init, reset_head=True)
  path = cache_path(config, dataset.train_images.shape[1:])
  if not os.path.exists(path):
    make_pretrained_backbone(config, dataset, pretrain_idx, path)
    return ckpt_lib.load_pretrained(path, init, reset_head=True)
  print(f"using the cached pretrained backbone {path}", flush=True)
  try:
    return ckpt_lib.load_pretrained(path, init, reset_head=True)
  except BackboneError as e:
    # A damaged cache file (a disk that filled up, a copy cut short) is rebuilt, not fatal;
    # the damaged file is kept beside it for inspection.
    damaged = path + ".damaged"
    os.replace(path, damaged)
    logging.warning("%s; it is kept as %s and the backbone is pretrained again", e, damaged)
    make_pretrained_backbone(config, dataset, pretrain_idx, path)
    return ckpt_lib.load_pretrained(path, init, reset_head=True)
