"""Test accuracy of the global model, batched inside one compiled program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from softjax.data import batching
from softjax.federated.types import ApplyFn


def make_eval(apply_fn: ApplyFn, batch_size: int):
  """Builds eval_fn(frozen, trainable, images, labels, mask) -> (correct, count).

  images/labels/mask are padded to a multiple of batch_size ([nb * bs, ...]); padded rows
  have mask 0 and are not counted.
  """

  def eval_fn(frozen, trainable, images, labels, mask):
    shape = (-1, batch_size)

    def one_batch(args):
      x, y, m = args
      logits = apply_fn(frozen, trainable, batching.preprocess(x))
      return jnp.sum((jnp.argmax(logits, -1) == y) * m), jnp.sum(m)

    batches = (images.reshape(shape + images.shape[1:]), labels.reshape(shape),
               mask.reshape(shape))
    correct, count = jax.lax.map(one_batch, batches)
    return correct.sum(), count.sum()

  return eval_fn
