"""Scaling past one device on fake CPU devices: the sharded round equals the unsharded one."""

import collections

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from softjax import federated
from softjax import mesh as mesh_lib
from softjax import sparsifiers
from tests.test_federated import make_data, tiny_setup


def test_suite_sees_four_fake_devices():
  assert jax.device_count() == 4  # tests/conftest.py


def soft_setup(num_clients=4):
  """tiny_setup with SOFT, error feedback and residuals of all N clients."""
  apply_fn, frozen, state, data = tiny_setup(num_clients=num_clients)
  state = federated.init_state(state.trainable.lora, state.trainable.head,
                               num_clients=num_clients, error_feedback=True)
  return apply_fn, frozen, state, data


def make_round(apply_fn, mesh=None, shard_data=False, parallelism=1):
  return federated.make_round(apply_fn, optimizer="sgd", local_steps=2, batch_size=4,
                              client_parallelism=parallelism,
                              sparsifier=sparsifiers.make_sparsifier("soft"),
                              mesh=mesh, shard_data=shard_data)


def place(mesh, frozen, state, data, shard_data=False):
  rep = mesh_lib.replicated(mesh)
  frozen = mesh_lib.place(frozen, rep)
  residual_sharding = jax.tree.map(
      lambda x: mesh_lib.leading_sharding(mesh, x.shape[0]), state.residuals)
  state = state._replace(trainable=mesh_lib.place(state.trainable, rep),
                         round=mesh_lib.place(state.round, rep),
                         residuals=mesh_lib.place(state.residuals, residual_sharding))
  data_sharding = mesh_lib.along_axis(mesh) if shard_data else rep
  data = data._replace(images=mesh_lib.place(data.images, data_sharding),
                       labels=mesh_lib.place(data.labels, data_sharding),
                       table=mesh_lib.place(data.table, rep),
                       counts=mesh_lib.place(data.counts, rep))
  return frozen, state, data


def hparams(k, dropped=()):
  received = np.ones(k)
  received[list(dropped)] = 0.0
  uplink = (np.full(k, 1e6), np.full(k, 1e9), np.full(k, 0.01), received)
  return federated.make_hparams(0.05, zeta=0.1, keep_ratio=0.5, uplink=uplink)


@pytest.mark.parametrize("devices,k", [(2, 4), (4, 4), (4, 3), (2, 3)])
def test_sharded_round_equals_unsharded_round(devices, k):
  """K divisible by the devices or not (3 clients on 2 or 4 devices: padded slots)."""
  apply_fn, frozen, state, data = soft_setup()
  clients = jnp.array([3, 0, 2, 1][:k], jnp.int32)
  hp = hparams(k, dropped=(1,))  # a lost upload keeps its whole update as residual
  want_state, want = jax.jit(make_round(apply_fn))(state, frozen, data, clients,
                                                   jax.random.key(1), hp)
  mesh = mesh_lib.make_mesh(devices, mesh_lib.CLIENTS)
  s_frozen, s_state, s_data = place(mesh, frozen, state, data)
  got_state, got = jax.jit(make_round(apply_fn, mesh))(s_state, s_frozen, s_data, clients,
                                                       jax.random.key(1), hp)
  chex.assert_trees_all_close(got_state, want_state, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
  chex.assert_shape(got.client_bits, (k,))  # the padded slots are not reported
  np.testing.assert_array_equal(got.client_bits, want.client_bits)
  # Every client that was not sampled keeps its residual exactly.
  for c in set(range(4)) - set(np.asarray(clients).tolist()):
    chex.assert_trees_all_equal(jax.tree.map(lambda r: r[c], got_state.residuals),
                                jax.tree.map(lambda r: r[c], state.residuals))


def test_sharded_outputs_carry_the_expected_shardings():
  apply_fn, frozen, state, data = soft_setup()
  mesh = mesh_lib.make_mesh(4, mesh_lib.CLIENTS)
  frozen, state, data = place(mesh, frozen, state, data)
  new_state, metrics = jax.jit(make_round(apply_fn, mesh))(
      state, frozen, data, jnp.array([0, 1, 2], jnp.int32), jax.random.key(0), hparams(3))
  for leaf in jax.tree.leaves(new_state.trainable) + jax.tree.leaves(metrics):
    assert leaf.sharding.is_fully_replicated
  for leaf in jax.tree.leaves(new_state.residuals):  # [N = 4, ...] split over 4 devices
    assert leaf.sharding.spec == P(mesh_lib.CLIENTS)
    assert {s.data.shape[0] for s in leaf.addressable_shards} == {1}


def test_sharded_training_set_gives_the_same_round():
  """mesh.shard_data: the examples split over the devices, each client's gathered to it."""
  apply_fn, frozen, state, data = soft_setup()
  clients = jnp.array([2, 0, 3], jnp.int32)
  want_state, want = jax.jit(make_round(apply_fn))(state, frozen, data, clients,
                                                   jax.random.key(2), hparams(3))
  mesh = mesh_lib.make_mesh(2, mesh_lib.CLIENTS)
  frozen, s_state, s_data = place(mesh, frozen, state, data, shard_data=True)
  assert s_data.images.sharding.spec == P(mesh_lib.CLIENTS)
  got_state, got = jax.jit(make_round(apply_fn, mesh, shard_data=True))(
      s_state, frozen, s_data, clients, jax.random.key(2), hparams(3))
  chex.assert_trees_all_close(got_state, want_state, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)


def test_sharded_round_compiles_once_across_rounds():
  apply_fn, frozen, state, data = soft_setup()
  mesh = mesh_lib.make_mesh(2, mesh_lib.CLIENTS)
  frozen, state, data = place(mesh, frozen, state, data)
  round_fn = make_round(apply_fn, mesh)
  traces = collections.Counter()

  def counted(*args):
    traces["n"] += 1
    return round_fn(*args)

  step = jax.jit(counted, donate_argnums=0)
  for t in range(3):
    clients = federated.sample_clients(0, t, 4, 3)
    state, _ = step(state, frozen, data, clients, jax.random.key(0), hparams(3))
  assert traces["n"] == 1
  assert int(state.round) == 3


def test_padded_count_and_mesh_size():
  mesh = mesh_lib.make_mesh(4, mesh_lib.CLIENTS)
  assert [mesh_lib.padded_count(k, mesh) for k in (1, 3, 4, 5, 8)] == [4, 4, 4, 8, 8]
  assert mesh_lib.padded_count(3, None) == 3
  assert mesh_lib.make_mesh(1, mesh_lib.CLIENTS) is None
  assert mesh_lib.mesh_size(mesh_lib.make_mesh(0, mesh_lib.CLIENTS)) == 4  # 0 = all
  with pytest.raises(ValueError, match="mesh.devices = 8"):
    mesh_lib.make_mesh(8, mesh_lib.CLIENTS)


def test_client_owner_is_contiguous_and_deterministic():
  np.testing.assert_array_equal(mesh_lib.client_owner(10, 4), [0, 0, 0, 1, 1, 2, 2, 2, 3, 3])
  np.testing.assert_array_equal(mesh_lib.client_owner(3, 1), [0, 0, 0])


def test_client_major_layout_puts_each_process_clients_in_its_block():
  clients = [np.array([7, 1]), np.array([4]), np.array([0, 2, 5]), np.array([3, 6])]
  layout = mesh_lib.client_major_layout(clients, num_processes=2, multiple=2)
  # Processes own clients {0, 1} (3 examples) and {2, 3} (5): blocks of 6 rows (multiple of 2).
  assert layout.block_rows == 6
  np.testing.assert_array_equal(layout.rows, [7, 1, 4, -1, -1, -1, 0, 2, 5, 3, 6, -1])
  for k, ix in enumerate(clients):
    row = layout.table[k, :layout.counts[k]]
    np.testing.assert_array_equal(layout.rows[row], ix)  # same examples, same order
    block = layout.owner[k]
    assert (row // layout.block_rows == block).all()


def test_layout_keeps_every_batch_a_client_sees():
  """The round on client-major data equals the round on the original layout, bit for bit."""
  apply_fn, frozen, state, data = soft_setup()
  images, labels = np.asarray(data.images), np.asarray(data.labels)
  clients = [np.asarray(data.table[k, :data.counts[k]]) for k in range(4)]
  layout = mesh_lib.client_major_layout(clients[::-1][::-1], num_processes=1, multiple=4)
  moved = federated.FederatedData(
      images=jnp.asarray(mesh_lib.gather_rows(images, layout.rows)),
      labels=jnp.asarray(mesh_lib.gather_rows(labels, layout.rows)),
      table=jnp.asarray(layout.table), counts=jnp.asarray(layout.counts))
  ids = jnp.array([1, 3], jnp.int32)
  step = jax.jit(make_round(apply_fn))
  a = step(state, frozen, data, ids, jax.random.key(3), hparams(2))
  b = step(state, frozen, moved, ids, jax.random.key(3), hparams(2))
  chex.assert_trees_all_equal(a, b)


def test_place_examples_shards_rows_over_the_mesh():
  data, images, labels, clients = make_data([5, 3, 4], side=2)
  layout = mesh_lib.client_major_layout(clients, num_processes=1, multiple=4)
  mesh = mesh_lib.make_mesh(4, mesh_lib.CLIENTS)
  sharded = mesh_lib.place_examples(images, layout, mesh, shard=True)
  assert sharded.shape == (12,) + images.shape[1:]
  assert sharded.sharding.spec == P(mesh_lib.CLIENTS)
  np.testing.assert_array_equal(np.asarray(sharded), images[layout.rows])
  assert mesh_lib.place_examples(images, layout, mesh, shard=False).sharding.is_fully_replicated
