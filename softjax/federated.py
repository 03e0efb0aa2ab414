"""The federated round: local LoRA training on every sampled client, then server aggregation.

One call of the jitted round function runs a whole round on the device:
  per client k in S_t: lax.scan over E local steps (batches gathered on the device) -> update
  clients: lax.map(..., batch_size=client_parallelism)  (1 = sequential in-graph, K = full vmap)
  server:  theta^{t+1} = theta^t + sum_k p_k * delta_k, with p_k = n_k / sum_{j in S_t} n_j,
           applied leaf by leaf, so B and A are averaged separately (ALGORITHM.md section 3).

Leading-axis conventions: `[K, ...]` sampled clients, `[N, ...]` all clients.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from softjax.data import batching

PyTree = Any
# apply_fn(frozen_params, trainable, images float32 [B, H, W, C]) -> logits [B, classes]
ApplyFn = Callable[[PyTree, PyTree, jax.Array], jax.Array]

HOST_STREAM_SAMPLING = 0  # host rng stream ids: np.random.default_rng([seed, stream, round])


class Trainable(NamedTuple):
  """What clients train and upload: LoRA factors and the classifier head."""
  lora: PyTree
  head: PyTree


class ServerState(NamedTuple):
  """The global model between rounds."""
  trainable: Trainable
  round: jax.Array  # int32 [], rounds completed


class FederatedData(NamedTuple):
  """Device-resident federated training set with per-client padded index tables."""
  images: jax.Array  # uint8 [M, H, W, C]
  labels: jax.Array  # int32 [M]
  table: jax.Array  # int32 [N, max_n], padded; row k lists client k's examples
  counts: jax.Array  # int32 [N], valid entries per row


class RoundHparams(NamedTuple):
  """Per-round hyperparameters passed as traced arrays, so new values never recompile."""
  client_lr: jax.Array  # float32 []


class RoundMetrics(NamedTuple):
  train_loss: jax.Array  # float32 [], data-weighted mean over sampled clients
  client_loss: jax.Array  # float32 [K], mean local loss per sampled client


def sample_clients(seed: int, round_index: int, num_clients: int, k: int) -> np.ndarray:
  """S_t: k distinct clients drawn uniformly, a pure function of (seed, round). Sorted, int32."""
  rng = np.random.default_rng([seed, HOST_STREAM_SAMPLING, round_index])
  return np.sort(rng.choice(num_clients, size=k, replace=False)).astype(np.int32)


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


def make_client_update(apply_fn: ApplyFn, *, optimizer: str, local_steps: int, batch_size: int):
  """Returns client_update(trainable, frozen, data, client_id, key, hparams) -> (delta, loss).

  The client starts from the global `trainable`, takes `local_steps` optimizer steps on
  batches of its own data, and returns its model update delta_k = theta_k - theta^t and its
  mean training loss. Only `trainable` is differentiated.
  """

  def client_update(trainable: Trainable, frozen: PyTree, data: FederatedData,
                    client_id: jax.Array, key: jax.Array, hparams: RoundHparams):
    tx = make_client_optimizer(optimizer, hparams.client_lr)
    count = data.counts[client_id]
    row = data.table[client_id]
    order = batching.client_permutation(key, count, data.table.shape[1])

    def loss_fn(params, x, y):
      return cross_entropy(apply_fn(frozen, params, x), y)

    def step(carry, s):
      params, opt_state = carry
      positions = batching.batch_positions(order, count, s, batch_size)
      x, y = batching.gather_batch(data.images, data.labels, row, positions)
      loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    (local, _), losses = jax.lax.scan(step, (trainable, tx.init(trainable)),
                                      jnp.arange(local_steps))
    return optax.tree.sub(local, trainable), losses.mean()

  return client_update


def aggregation_weights(counts: jax.Array) -> jax.Array:
  """p_k = n_k / sum_{j in S_t} n_j (ALGORITHM.md section 3). counts: [K] -> [K]."""
  counts = counts.astype(jnp.float32)
  return counts / counts.sum()


def weighted_sum(deltas: PyTree, weights: jax.Array) -> PyTree:
  """sum_k p_k * delta_k over the leading client axis of every leaf ([K, ...] -> [...])."""
  return jax.tree.map(lambda d: jnp.tensordot(weights, d, axes=1), deltas)


def make_round(apply_fn: ApplyFn, *, optimizer: str, local_steps: int, batch_size: int,
               client_parallelism: int):
  """Builds round_fn(state, frozen, data, client_ids [K], root_key, hparams) -> (state, metrics).

  Dense federated LoRA (FedAvg of B, A and the head, each leaf separately). The result is
  not jitted, so callers can wrap it (jit with donation, vmap over a sweep axis, ...).
  """
  client_update = make_client_update(apply_fn, optimizer=optimizer, local_steps=local_steps,
                                     batch_size=batch_size)

  def round_fn(state: ServerState, frozen: PyTree, data: FederatedData,
               client_ids: jax.Array, root_key: jax.Array, hparams: RoundHparams):
    chex.assert_rank(client_ids, 1)
    round_key = jax.random.fold_in(root_key, state.round)
    # Keys follow the client id, not its slot in S_t, so a client's data order does not
    # depend on which other clients were sampled with it.
    keys = jax.vmap(lambda k: jax.random.fold_in(round_key, k))(client_ids)

    def one_client(args):
      client_id, key = args
      return client_update(state.trainable, frozen, data, client_id, key, hparams)

    deltas, losses = jax.lax.map(one_client, (client_ids, keys), batch_size=client_parallelism)
    weights = aggregation_weights(data.counts[client_ids])
    trainable = optax.tree.add(state.trainable, weighted_sum(deltas, weights))
    metrics = RoundMetrics(train_loss=jnp.dot(weights, losses), client_loss=losses)
    return ServerState(trainable=trainable, round=state.round + 1), metrics

  return round_fn


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
