"""Test accuracy of the global model, batched inside one compiled program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from softjax.data import batching
from softjax.federated.types import ApplyFn
from softjax.models import lora as lora_lib


def make_eval(apply_fn: ApplyFn, batch_size: int, adapter_scale: float = 1.0):
  """Builds eval_fn(frozen, folded, trainable, images, labels, masks) -> (correct [M],
  count [M]); `folded` is the state's FedEx-LoRA folds, added to the frozen kernels at
  `adapter_scale` (() when the rule folds nothing).

  images/labels are padded to a multiple of batch_size ([nb * bs, ...]); masks is [M, nb * bs],
  one 0/1 row per set of examples counted (the whole split, a subset of it), so one pass over
  the images gives every set's accuracy; padded rows are 0 in every mask.
  """

  def eval_fn(frozen, folded, trainable, images, labels, masks):
    shape = (-1, batch_size)
    frozen = lora_lib.fold_into(frozen, folded, adapter_scale)

    def one_batch(args):
      x, y = args
      logits = apply_fn(frozen, trainable, batching.preprocess(x))
      return (jnp.argmax(logits, -1) == y).astype(jnp.float32)

    hits = jax.lax.map(one_batch, (images.reshape(shape + images.shape[1:]),
                                   labels.reshape(shape))).reshape(-1)
    return masks @ hits, masks.sum(-1)

  return eval_fn
