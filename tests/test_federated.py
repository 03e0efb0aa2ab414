"""The federated round: hand-computed FedAvg, vmap vs sequential clients, no recompiles."""

import collections

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from softjax.data import batching
from softjax.federated import aggregation, evaluation, schedule
from softjax.federated import client as client_lib
from softjax.federated import round as round_lib
from softjax.federated import types as fl_types
from softjax.sparsify import sparsifier as sparsifiers
from tests.support import linear_apply, make_data, tiny_setup


def test_sample_clients_is_pure_and_without_replacement():
  a = schedule.sample_clients(seed=3, round_index=7, num_clients=20, k=5)
  b = schedule.sample_clients(seed=3, round_index=7, num_clients=20, k=5)
  c = schedule.sample_clients(seed=3, round_index=8, num_clients=20, k=5)
  np.testing.assert_array_equal(a, b)
  assert len(set(a.tolist())) == 5 and a.dtype == np.int32
  assert not np.array_equal(a, c)
  assert (a >= 0).all() and (a < 20).all()


def test_aggregation_weights_by_data_size():
  p = aggregation.aggregation_weights(jnp.array([30, 10]))
  np.testing.assert_allclose(p, [0.75, 0.25])
  total = sparsifiers.weighted_sum({"x": jnp.array([[4.0, 8.0], [-4.0, 0.0]])}, p)
  np.testing.assert_allclose(total["x"], [0.75 * 4 - 0.25 * 4, 0.75 * 8])


def test_two_client_fedavg_matches_hand_computation():
  """One full-batch SGD step per client from W = 0, then the n_k-weighted average.

  With W = 0 every softmax is uniform, so client k's gradient is X_k^T (1/c - Y_k) / n_k and its
  update is -lr times that, whatever order its examples are visited in.
  """
  sizes, c, lr = (6, 2), 3, 0.5
  data, images, labels, clients = make_data(sizes, num_classes=c)
  x = (images.reshape(len(labels), -1) / 255.0 - 0.5) / 0.5
  onehot = np.eye(c)[labels]
  deltas = [-lr * x[idx].T @ (1.0 / c - onehot[idx]) / len(idx) for idx in clients]
  expected = (6 / 8) * deltas[0] + (2 / 8) * deltas[1]

  state = fl_types.init_state({}, {"w": jnp.zeros((4, c))}, num_clients=2,
                               error_feedback=False)
  full = round_lib.make_round(linear_apply, optimizer="sgd", local_steps=1, batch_size=6,
                              client_parallelism=2)
  # Client 1 has 2 examples: a batch of 6 wraps around them 3 times, which leaves the mean
  # gradient unchanged, so the hand formula still holds.
  new_state, metrics = jax.jit(full)(state, None, data, jnp.array([0, 1], jnp.int32),
                                     jax.random.key(0), fl_types.make_hparams(lr))
  np.testing.assert_allclose(new_state.trainable.head["w"], expected, rtol=1e-5, atol=1e-6)
  assert int(new_state.round) == 1
  np.testing.assert_allclose(metrics.train_loss, np.log(c), rtol=1e-6)  # uniform softmax at W=0
  chex.assert_shape(metrics.client_loss, (2,))


@pytest.mark.parametrize("optimizer", ["sgd", pytest.param("adam", marks=pytest.mark.slow)])
def test_sequential_and_vmapped_clients_agree(optimizer):
  apply_fn, frozen, state, data = tiny_setup()
  clients = jnp.array([0, 2, 3], jnp.int32)
  hp = fl_types.make_hparams(0.05)
  results = []
  for parallelism in (1, 3):
    round_fn = round_lib.make_round(apply_fn, optimizer=optimizer, local_steps=3, batch_size=4,
                                    client_parallelism=parallelism)
    results.append(jax.jit(round_fn)(state, frozen, data, clients, jax.random.key(1), hp))
  (s1, m1), (s3, m3) = results
  chex.assert_trees_all_close(s1.trainable, s3.trainable, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(m1, m3, rtol=1e-5, atol=1e-6)
  # The round really trained something.
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), s1.trainable, state.trainable)
  assert all(v > 0 for v in jax.tree.leaves(moved))


def test_round_matches_loop_of_client_updates():
  """The mapped round equals a Python loop over client_update plus weighted averaging."""
  apply_fn, frozen, state, data = tiny_setup()
  clients = np.array([1, 3], np.int32)
  hp = fl_types.make_hparams(0.05)
  root = jax.random.key(4)
  round_fn = round_lib.make_round(apply_fn, optimizer="sgd", local_steps=2, batch_size=4,
                                  client_parallelism=1)
  new_state, _ = jax.jit(round_fn)(state, frozen, data, jnp.asarray(clients), root, hp)

  update = jax.jit(client_lib.make_client_update(apply_fn, optimizer="sgd", local_steps=2,
                                                batch_size=4))
  round_key = jax.random.fold_in(root, 0)
  deltas = [optax.tree.sub(update(state.trainable, frozen, data, jnp.int32(k),
                                  jax.random.fold_in(round_key, k), hp)[0], state.trainable)
            for k in clients]
  n = np.asarray(data.counts)[clients].astype(np.float64)
  p = n / n.sum()
  expected = jax.tree.map(lambda t, d0, d1: t + p[0] * d0 + p[1] * d1, state.trainable,
                          *deltas)
  chex.assert_trees_all_close(new_state.trainable, expected, rtol=1e-5, atol=1e-6)


def test_no_recompilation_across_rounds_clients_and_learning_rates():
  apply_fn, frozen, state, data = tiny_setup()
  traces = collections.Counter()
  round_fn = round_lib.make_round(apply_fn, optimizer="sgd", local_steps=2, batch_size=4,
                                  client_parallelism=1)

  def counted(*args):
    traces["n"] += 1
    return round_fn(*args)

  step = jax.jit(counted, donate_argnums=0)
  for t, lr in enumerate([0.1, 0.05, 0.01, 0.2]):
    clients = schedule.sample_clients(0, t, 4, 2)
    state, _ = step(state, frozen, data, clients, jax.random.key(0),
                    fl_types.make_hparams(lr))
  assert traces["n"] == 1
  assert int(state.round) == 4


def test_padding_is_never_trained_on():
  """A client's batches only ever hold its own examples, never the table's padding."""
  data, images, labels, clients = make_data([3, 7], num_classes=3)
  order = batching.client_permutation(jax.random.key(0), data.counts[0], data.table.shape[1])
  seen = set()
  for s in range(5):
    pos = batching.batch_positions(order, data.counts[0], s, 2)
    seen.update(np.asarray(data.table[0][pos]).tolist())
  assert seen == set(clients[0].tolist())


def test_eval_counts_each_mask_row_from_one_pass():
  apply_fn, frozen, state, _ = tiny_setup()
  eval_fn = jax.jit(evaluation.make_eval(apply_fn, batch_size=4))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(8, 8, 8, 1), dtype=np.uint8)
  labels = rng.integers(0, 5, size=8).astype(np.int32)
  masks = np.array([[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]], np.float32)
  correct, count = eval_fn(frozen, (), state.trainable, images, labels, masks)
  logits = apply_fn(frozen, state.trainable, batching.preprocess(jnp.asarray(images)))
  hits = np.argmax(logits, -1) == labels
  chex.assert_shape(correct, (2,))
  np.testing.assert_array_equal(np.asarray(count), [5, 3])
  np.testing.assert_array_equal(np.asarray(correct), [hits[:5].sum(), hits[:3].sum()])


def test_client_lr_schedule_by_hand():
  assert schedule.client_lr_at(7, 10, 0.1, "constant", 0.1) == 0.1
  assert schedule.client_lr_at(0, 11, 0.1, "cosine", 0.2) == pytest.approx(0.1)
  assert schedule.client_lr_at(10, 11, 0.1, "cosine", 0.2) == pytest.approx(0.02)
  # Halfway the cosine term is 1/2: 0.1 * (0.2 + 0.8 * 0.5).
  assert schedule.client_lr_at(5, 11, 0.1, "cosine", 0.2) == pytest.approx(0.06)
  lrs = [schedule.client_lr_at(t, 11, 0.1, "cosine", 0.2) for t in range(11)]
  assert all(a >= b for a, b in zip(lrs, lrs[1:]))


@pytest.mark.parametrize("rounds, final_fraction", [(2, 0.0), (11, 0.2), (80, 0.1), (200, 0.5)])
def test_client_lr_schedule_rounds_to_the_float64_closed_form(rounds, final_fraction):
  """The optax schedule, as the round sees it (float32), equals the closed form in float64."""
  t = np.arange(rounds, dtype=np.float64)
  exact = 0.03 * (final_fraction + (1 - final_fraction) * 0.5 * (1 + np.cos(np.pi * t /
                                                                           (rounds - 1))))
  got = [schedule.client_lr_at(i, rounds, 0.03, "cosine", final_fraction) for i in range(rounds)]
  np.testing.assert_array_equal(np.float32(got), np.float32(exact))
  np.testing.assert_allclose(got, exact, rtol=1e-15)
