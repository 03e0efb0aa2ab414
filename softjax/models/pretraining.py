"""Central pretraining of a ViT backbone on held-out data (no pretrained weights exist offline).

The federated task fine-tunes this backbone with LoRA. Pretraining uses only the training
images that `pretrain_federated_split` holds out from the clients, restricted to the first
`num_classes` classes, so the federated run adapts to unseen data and unseen classes.
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from softjax.data import batching
from softjax.models import lora as lora_lib
from softjax.models import vit

PyTree = Any


def pretrain_examples(labels: np.ndarray, pretrain_idx: np.ndarray, num_classes: int) -> np.ndarray:
  """Indices of held-out training examples whose label is below `num_classes`."""
  return pretrain_idx[labels[pretrain_idx] < num_classes]


def make_pretrain_step(model: vit.VisionTransformer, tx: optax.GradientTransformation,
                       batch_size: int, steps_per_call: int):
  """Returns a jitted function running `steps_per_call` full-weight AdamW steps in a scan."""

  def loss_fn(params, x, y):
    logits = model.apply({"params": params}, x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == y)

  def one_step(carry, key):
    params, opt_state, images, labels = carry
    pick = jax.random.randint(key, (batch_size,), 0, labels.shape[0])
    x, y = batching.preprocess(images[pick]), labels[pick]
    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state, images, labels), (loss, acc)

  @jax.jit
  def run_steps(params, opt_state, images, labels, key):
    keys = jax.random.split(key, steps_per_call)
    (params, opt_state, _, _), (loss, acc) = jax.lax.scan(
        one_step, (params, opt_state, images, labels), keys)
    return params, opt_state, loss.mean(), acc.mean()

  return run_steps


def pretrain_backbone(variant: str, images: np.ndarray, labels: np.ndarray,
                      cfg: ml_collections.ConfigDict, log_every: int = 100) -> PyTree:
  """Trains every weight of a ViT `variant` on (images, labels); returns its params.

  Args:
    variant: a name in vit.VARIANTS.
    images: uint8 [n, H, W, C] pretraining images.
    labels: int32 [n], in [0, cfg.num_classes).
    cfg: the `pretrain` config block (steps, batch_size, learning_rate, weight_decay, seed,
      num_classes).
    log_every: steps between log lines (also the scan length of one jitted call).

  Returns:
    The params tree (head of size cfg.num_classes; the federated loader resets it).
  """
  h, w, c = images.shape[1:]
  config = vit.make_vit_config(variant, image_size=h, channels=c, num_classes=cfg.num_classes)
  model = vit.VisionTransformer(config, vit.LoRAConfig(rank=1, alpha=1.0, targets=()))
  key = jax.random.key(cfg.seed)
  init_key, data_key = jax.random.split(key)
  params = lora_lib.init_params(model, init_key, (h, w, c))
  # The head starts at zero for fine-tuning; from scratch it needs a random init to train.
  params["head"]["kernel"] = 0.02 * jax.random.normal(
      jax.random.fold_in(init_key, 1), params["head"]["kernel"].shape)
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, cfg.learning_rate, warmup_steps=max(1, cfg.steps // 10), decay_steps=cfg.steps)
  tx = optax.adamw(schedule, weight_decay=cfg.weight_decay)
  opt_state = tx.init(params)
  chunk = math.gcd(cfg.steps, log_every)  # divides the run exactly, so no step is wasted
  run_steps = make_pretrain_step(model, tx, cfg.batch_size, chunk)
  images_d, labels_d = jax.device_put(images), jax.device_put(labels.astype(np.int32))
  start = time.time()
  done = 0
  while done < cfg.steps:
    params, opt_state, loss, acc = run_steps(params, opt_state, images_d, labels_d,
                                             jax.random.fold_in(data_key, done))
    done += chunk
    print(f"pretrain step {done}/{cfg.steps}: loss {float(loss):.4f}, train acc "
          f"{float(acc):.3f} ({time.time() - start:.0f} s)", flush=True)
  return jax.device_get(params)
