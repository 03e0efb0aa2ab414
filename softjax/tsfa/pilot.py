"""The pilot-gradient spectrum option of the TSFA offline stage (ALGORITHM.md 5, step 4).

Before round 0 the server estimates how the energy of the ideal full-weight update spreads over
rank components: it takes the gradient of the training loss with respect to every adapted
frozen kernel, at the pretrained weights, on one batch from each of a few clients, and returns
the singular values of those gradients. `tsfa.spectrum_energies(singular_values=...)` turns them
into the normalized energies the rank objective J(r) uses in place of the power law.

[choice] Layers are pooled by averaging their normalized energy spectra (each layer's squared
singular values divided by their sum), so every adapted matrix counts equally whatever its
gradient's scale; the result is returned as singular values (the square root of the pooled
energies).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from softjax.data import batching
from softjax.federated import types as fl_types
from softjax.models import lora as lora_lib

PyTree = Any


def pilot_batch(data: fl_types.FederatedData, num_clients: int, batch_size: int):
  """The first `batch_size` examples of each of the first `num_clients` clients (uint8, int32)."""
  rows = data.table[:num_clients, :batch_size].reshape(-1)
  return data.images[rows], data.labels[rows]


def kernel_gradients(apply_fn: fl_types.ApplyFn, frozen: PyTree, trainable: fl_types.Trainable,
                     images: jax.Array, labels: jax.Array) -> list[np.ndarray]:
  """dL/dW of every adapted kernel as a [d_out, d_in] matrix, in `lora_layers` order.

  With B = 0 at initialization the adapted model equals the pretrained one, so this is the
  gradient of the pretrained model's loss.
  """

  def loss(params):
    logits = apply_fn(params, trainable, batching.preprocess(images))
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  grads = jax.jit(jax.grad(loss))(frozen)
  kernels = {lora_lib.path_str(p): g for p, g in jax.tree_util.tree_leaves_with_path(grads)}
  out = []
  for layer, pair in lora_lib.lora_layers(trainable.lora):
    d_in, d_out = pair["A"].shape[1], pair["B"].shape[0]
    kernel = kernels.get(layer + "/kernel")
    if kernel is None:
      raise ValueError(f"no frozen kernel for the adapted layer {layer}")
    out.append(np.asarray(jnp.reshape(kernel, (d_in, d_out)).T, np.float64))
  return out


def pooled_singular_values(gradients: list[np.ndarray]) -> np.ndarray:
  """sqrt of the mean over layers of each layer's normalized squared singular values."""
  if not gradients:
    raise ValueError("the pilot gradient needs at least one adapted layer")
  length = min(min(g.shape) for g in gradients)
  energies = []
  for g in gradients:
    s2 = np.linalg.svd(g, compute_uv=False)[:length] ** 2
    total = s2.sum()
    energies.append(s2 / total if total > 0 else np.full(length, 1.0 / length))
  return np.sqrt(np.mean(energies, axis=0))
