"""What one client does in a round: E local optimizer steps on its own data.

References: ALGORITHM.md section 2.1 (the local objective F_k + zeta * R); FedProx's proximal
term (Li et al., *Federated Optimization in Heterogeneous Networks*, MLSys 2020) and SCAFFOLD's
gradient correction (Karimireddy et al., ICML 2020): docs/algorithm.md section 6.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from softjax.data import batching
from softjax.models import lora as lora_lib
from softjax.federated.types import ApplyFn, FederatedData, PyTree, RoundHparams, Trainable
from softjax.sparsify import soft


def make_client_optimizer(name: str, learning_rate: jax.Array) -> optax.GradientTransformation:
  """The local optimizer; built inside the trace so the learning rate can be a traced array."""
  if name == "sgd":
    return optax.sgd(learning_rate)
  if name == "momentum":
    return optax.sgd(learning_rate, momentum=0.9)
  if name == "adam":
    return optax.adam(learning_rate)
  raise ValueError(f"unknown client optimizer {name!r}")


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def proximal_term(params: PyTree, anchor: PyTree) -> jax.Array:
  """FedProx's ||w - w^t||^2 / 2 over every trained leaf (factors and head)."""
  return 0.5 * sum(jnp.sum(jnp.square(p - a))
                   for p, a in zip(jax.tree.leaves(params), jax.tree.leaves(anchor)))


def make_client_update(apply_fn: ApplyFn, *, optimizer: str, local_steps: int, batch_size: int,
                       penalty: str = "offdiag", prox_mu: float = 0.0):
  """Returns client_update(trainable, frozen, data, client_id, key, hparams) -> (local, loss).

  The client starts from the global `trainable`, takes `local_steps` optimizer steps on
  batches of its own data with the objective F_k + zeta * R (ALGORITHM.md 2.1), plus FedProx's
  mu ||w - w^t||^2 / 2 when `prox_mu` > 0, and returns its trained `trainable` and its mean
  training loss F_k. Only `trainable` is differentiated.
  """

  def client_update(trainable: Trainable, frozen: PyTree, data: FederatedData,
                    client_id: jax.Array, key: jax.Array, hparams: RoundHparams,
                    correction: Trainable | None = None):
    """`correction`: SCAFFOLD's c - c_k, added to every local gradient (None: off)."""
    tx = make_client_optimizer(optimizer, hparams.client_lr)
    count = data.counts[client_id]
    row = data.table[client_id]
    order = batching.client_permutation(key, count, data.table.shape[1])

    def loss_fn(params, x, y):
      loss = cross_entropy(apply_fn(frozen, params, x), y)
      reg = soft.orthogonality_penalty(params.lora, kind=penalty)
      objective = loss + hparams.zeta * reg
      if prox_mu:  # static: a run without FedProx traces no proximal term
        objective = objective + prox_mu * proximal_term(params, trainable)
      return objective, loss

    def step(carry, s):
      params, opt_state = carry
      positions = batching.batch_positions(order, count, s, batch_size)
      x, y = batching.gather_batch(data.images, data.labels, row, positions)
      (_, loss), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, y)
      if correction is not None:
        grads = jax.tree.map(jnp.add, grads, correction)
      if hparams.factor_mask is not None:  # the rule freezes B or A, or ranks beyond r_k
        mask = hparams.factor_mask
        grads = grads._replace(lora=lora_lib.scale_components(grads.lora, mask[0], mask[1]))
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    (local, _), losses = jax.lax.scan(step, (trainable, tx.init(trainable)),
                                      jnp.arange(local_steps))
    return local, losses.mean()

  return client_update
