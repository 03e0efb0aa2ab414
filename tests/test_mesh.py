"""Scaling past one device on fake CPU devices: the sharded round equals the unsharded one."""

import collections

import chex
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from softjax.data import layout as layout_lib
from softjax.federated import placement, schedule
from softjax.federated import round as round_lib
from softjax.federated import types as fl_types
from softjax.sparsify import sparsifier as sparsifiers
from tests.support import (env_without_compilation_cache, make_data, tiny_setup,
                           with_overrides)


def test_suite_sees_four_fake_devices():
  assert jax.device_count() == 4  # tests/conftest.py


def soft_setup(num_clients=4):
  """tiny_setup with SOFT, error feedback and residuals of all N clients."""
  apply_fn, frozen, state, data = tiny_setup(num_clients=num_clients)
  state = fl_types.init_state(state.trainable.lora, state.trainable.head,
                               num_clients=num_clients, error_feedback=True)
  return apply_fn, frozen, state, data


def make_round(apply_fn, mesh=None, shard_data=False, parallelism=1):
  phases = round_lib.make_phases(apply_fn, optimizer="sgd", local_steps=2, batch_size=4,
                                 client_parallelism=parallelism,
                                 sparsifier=sparsifiers.make_sparsifier("soft"))
  return placement.place_round(phases, mesh, shard_data)


def jit_round(apply_fn, mesh, state, shard_data=False, **jit_kwargs):
  """The placed round jitted as the runner jits it: the state's layout pinned at the jit."""
  return jax.jit(make_round(apply_fn, mesh, shard_data), **jit_kwargs,
                 out_shardings=placement.round_out_shardings(state, mesh))


def place(mesh, frozen, state, data, shard_data=False):
  rep = placement.replicated(mesh)
  data_sharding = placement.along_axis(mesh) if shard_data else rep
  data = data._replace(images=placement.place(data.images, data_sharding),
                       labels=placement.place(data.labels, data_sharding),
                       table=placement.place(data.table, rep),
                       counts=placement.place(data.counts, rep))
  return (placement.place(frozen, rep), placement.place_state(state, mesh, stacked=False), data)


def hparams(k, dropped=()):
  received = np.ones(k)
  received[list(dropped)] = 0.0
  uplink = (np.full(k, 1e6), np.full(k, 1e9), np.full(k, 0.01), received)
  return fl_types.make_hparams(0.05, zeta=0.1, keep_ratio=0.5, uplink=uplink)


@pytest.mark.parametrize("devices,k", [
    pytest.param(2, 4, marks=pytest.mark.slow), pytest.param(4, 4, marks=pytest.mark.slow),
    pytest.param(4, 3, marks=pytest.mark.slow), (2, 3)])
def test_sharded_round_equals_unsharded_round(devices, k):
  """K divisible by the devices or not (3 clients on 2 or 4 devices: padded slots)."""
  apply_fn, frozen, state, data = soft_setup()
  clients = jnp.array([3, 0, 2, 1][:k], jnp.int32)
  hp = hparams(k, dropped=(1,))  # a lost upload keeps its whole update as residual
  want_state, want = jax.jit(make_round(apply_fn))(state, frozen, data, clients,
                                                   jax.random.key(1), hp)
  mesh = placement.make_mesh(devices, placement.CLIENTS)
  s_frozen, s_state, s_data = place(mesh, frozen, state, data)
  got_state, got = jit_round(apply_fn, mesh, s_state)(s_state, s_frozen, s_data, clients,
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
  mesh = placement.make_mesh(4, placement.CLIENTS)
  frozen, state, data = place(mesh, frozen, state, data)
  new_state, metrics = jit_round(apply_fn, mesh, state)(
      state, frozen, data, jnp.array([0, 1, 2], jnp.int32), jax.random.key(0), hparams(3))
  for leaf in jax.tree.leaves(new_state.trainable) + jax.tree.leaves(metrics):
    assert leaf.sharding.is_fully_replicated
  for leaf in jax.tree.leaves(new_state.residuals):  # [N = 4, ...] split over 4 devices
    assert leaf.sharding.spec == P(placement.CLIENTS)
    assert {s.data.shape[0] for s in leaf.addressable_shards} == {1}


@pytest.mark.slow
def test_sharded_training_set_gives_the_same_round():
  """mesh.shard_data: the examples split over the devices, each client's gathered to it."""
  apply_fn, frozen, state, data = soft_setup()
  clients = jnp.array([2, 0, 3], jnp.int32)
  want_state, want = jax.jit(make_round(apply_fn))(state, frozen, data, clients,
                                                   jax.random.key(2), hparams(3))
  mesh = placement.make_mesh(2, placement.CLIENTS)
  frozen, s_state, s_data = place(mesh, frozen, state, data, shard_data=True)
  assert s_data.images.sharding.spec == P(placement.CLIENTS)
  got_state, got = jit_round(apply_fn, mesh, s_state, shard_data=True)(
      s_state, frozen, s_data, clients, jax.random.key(2), hparams(3))
  chex.assert_trees_all_close(got_state, want_state, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)


def test_sharded_round_compiles_once_across_rounds():
  apply_fn, frozen, state, data = soft_setup()
  mesh = placement.make_mesh(2, placement.CLIENTS)
  frozen, state, data = place(mesh, frozen, state, data)
  round_fn = make_round(apply_fn, mesh)
  traces = collections.Counter()

  def counted(*args):
    traces["n"] += 1
    return round_fn(*args)

  step = jax.jit(counted, donate_argnums=0,
                 out_shardings=placement.round_out_shardings(state, mesh))
  for t in range(3):
    clients = schedule.sample_clients(0, t, 4, 3)
    state, _ = step(state, frozen, data, clients, jax.random.key(0), hparams(3))
  assert traces["n"] == 1
  assert int(state.round) == 3


def test_padded_count_and_mesh_size():
  mesh = placement.make_mesh(4, placement.CLIENTS)
  assert [placement.padded_count(k, mesh) for k in (1, 3, 4, 5, 8)] == [4, 4, 4, 8, 8]
  assert placement.padded_count(3, None) == 3
  assert placement.make_mesh(1, placement.CLIENTS) is None
  assert placement.mesh_size(placement.make_mesh(0, placement.CLIENTS)) == 4  # 0 = all
  with pytest.raises(ValueError, match="mesh.devices = 8"):
    placement.make_mesh(8, placement.CLIENTS)


def test_client_owner_is_contiguous_and_deterministic():
  np.testing.assert_array_equal(layout_lib.client_owner(10, 4), [0, 0, 0, 1, 1, 2, 2, 2, 3, 3])
  np.testing.assert_array_equal(layout_lib.client_owner(3, 1), [0, 0, 0])


def test_client_major_layout_puts_each_process_clients_in_its_block():
  clients = [np.array([7, 1]), np.array([4]), np.array([0, 2, 5]), np.array([3, 6])]
  layout = layout_lib.client_major_layout(clients, num_processes=2, multiple=2)
  # Processes own clients {0, 1} (3 examples) and {2, 3} (5): blocks of 6 rows (multiple of 2).
  assert layout.block_rows == 6
  np.testing.assert_array_equal(layout.rows, [7, 1, 4, -1, -1, -1, 0, 2, 5, 3, 6, -1])
  for k, ix in enumerate(clients):
    row = layout.table[k, :layout.counts[k]]
    np.testing.assert_array_equal(layout.rows[row], ix)  # same examples, same order
    block = layout.owner[k]
    assert (row // layout.block_rows == block).all()


@pytest.mark.slow
def test_layout_keeps_every_batch_a_client_sees():
  """The round on client-major data equals the round on the original layout, bit for bit."""
  apply_fn, frozen, state, data = soft_setup()
  images, labels = np.asarray(data.images), np.asarray(data.labels)
  clients = [np.asarray(data.table[k, :data.counts[k]]) for k in range(4)]
  layout = layout_lib.client_major_layout(clients[::-1][::-1], num_processes=1, multiple=4)
  moved = fl_types.FederatedData(
      images=jnp.asarray(layout_lib.gather_rows(images, layout.rows)),
      labels=jnp.asarray(layout_lib.gather_rows(labels, layout.rows)),
      table=jnp.asarray(layout.table), counts=jnp.asarray(layout.counts))
  ids = jnp.array([1, 3], jnp.int32)
  step = jax.jit(make_round(apply_fn))
  a = step(state, frozen, data, ids, jax.random.key(3), hparams(2))
  b = step(state, frozen, moved, ids, jax.random.key(3), hparams(2))
  chex.assert_trees_all_equal(a, b)


def test_place_examples_shards_rows_over_the_mesh():
  data, images, labels, clients = make_data([5, 3, 4], side=2)
  layout = layout_lib.client_major_layout(clients, num_processes=1, multiple=4)
  mesh = placement.make_mesh(4, placement.CLIENTS)
  sharded = placement.place_examples(images, layout, mesh, shard=True)
  assert sharded.shape == (12,) + images.shape[1:]
  assert sharded.sharding.spec == P(placement.CLIENTS)
  np.testing.assert_array_equal(np.asarray(sharded), images[layout.rows])
  assert placement.place_examples(images, layout, mesh, shard=False).sharding.is_fully_replicated


# End to end through experiment.run on the testing config (K = 3 clients, N = 6).

ROW_FIELDS = ("train_loss", "test_accuracy", "dropped_energy", "cov_term", "latency_s", "queue")


def run_config(cache_dir, **overrides):
  from configs import testing

  config = testing.get_config("rounds=3").unlock()
  config.model.cache_dir = cache_dir
  config.method.name, config.method.keep_ratio, config.method.zeta = "soft", 0.5, 0.1
  config.controller.name = "osfa"
  return with_overrides(config, overrides)


def assert_rows_close(got, want):
  assert len(got) == len(want)
  for g, w in zip(got, want):
    assert g["uplink_bits"] == w["uplink_bits"] and g["kept_components"] == w["kept_components"]
    for field in ROW_FIELDS:
      if field in w:
        np.testing.assert_allclose(g[field], w[field], rtol=1e-4, atol=1e-6, err_msg=field)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [{"mesh.devices": 2},
                                       {"mesh.devices": 0, "mesh.shard_data": True},
                                       {"mesh.devices": 4, "fl.client_store": "host"}],
                         ids=["2_devices", "all_devices_sharded_data", "host_store_padded"])
def test_sharded_run_equals_unsharded_run(cache_dir, tmp_path, overrides):
  from softjax.run import experiment

  want = experiment.run(run_config(cache_dir), str(tmp_path / "one"))
  got = experiment.run(run_config(cache_dir, **overrides), str(tmp_path / "mesh"))
  assert (want["devices"], got["devices"]) == (1, overrides["mesh.devices"] or 4)
  assert got["round_traces"] == 1
  assert_rows_close(got["rows"], want["rows"])


@pytest.mark.slow
@pytest.mark.parametrize("store", ["device", "host"])
def test_sharded_sweep_splits_members_over_devices(cache_dir, tmp_path, store):
  from softjax.run import experiment

  sweep = {"sweep.zeta": "0,0.1", "sweep.mode": "zip"}
  want = experiment.run(run_config(cache_dir, **sweep), str(tmp_path / "one"))
  got = experiment.run(run_config(cache_dir, **sweep, **{"mesh.devices": 2,
                                                         "fl.client_store": store}),
                       str(tmp_path / "mesh"))
  assert got["devices"] == 2 and got["round_traces"] == 1
  assert_rows_close(got["rows"], want["rows"])


def test_mesh_config_rules_name_their_field(cache_dir, tmp_path):
  from softjax import config as config_lib
  from softjax.run import experiment

  with pytest.raises(config_lib.ConfigError, match=r"mesh.devices = 8 .* at most the 4 devices"):
    experiment.run(run_config(cache_dir, **{"mesh.devices": 8}), str(tmp_path / "a"))
  with pytest.raises(config_lib.ConfigError, match=r"mesh.devices = 3 .* divide the sweep's 2"):
    experiment.run(run_config(cache_dir, **{"mesh.devices": 3, "sweep.zeta": "0,0.1"}),
                   str(tmp_path / "b"))
  with pytest.raises(config_lib.ConfigError, match="mesh.shard_data .* several devices"):
    config_lib.validate(run_config(cache_dir, **{"mesh.shard_data": True}))
  with pytest.raises(config_lib.ConfigError, match="mesh.devices = 2 .* mesh.distributed"):
    config_lib.validate(run_config(cache_dir, **{"mesh.devices": 2, "mesh.distributed": True}))


def free_port() -> int:
  import socket

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_run_feeds_own_clients_and_equals_one_process(cache_dir, tmp_path):
  """Two launcher processes with 2 CPU devices each (gloo collectives over loopback), joined by
  jax.distributed, the training set split by client blocks: the rows equal a one-device run."""
  import os
  import subprocess
  import sys

  from softjax.run import experiment
  from softjax.run import metrics as metrics_lib

  want = experiment.run(run_config(cache_dir), str(tmp_path / "one"))  # also caches the backbone
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  workdir, port = str(tmp_path / "multi"), free_port()
  command = [sys.executable, "-m", "experiments.run", "--config=configs/testing.py:rounds=3",
             f"--workdir={workdir}", f"--config.model.cache_dir={cache_dir}",
             "--config.method.name=soft", "--config.method.keep_ratio=0.5",
             "--config.method.zeta=0.1", "--config.controller.name=osfa",
             "--config.mesh.distributed=True", "--config.mesh.devices=0",
             "--config.mesh.shard_data=True",
             f"--config.mesh.coordinator_address=127.0.0.1:{port}",
             "--config.mesh.num_processes=2"]
  env = env_without_compilation_cache(JAX_NUM_CPU_DEVICES="2")
  procs = [subprocess.Popen(command + [f"--config.mesh.process_id={p}"], cwd=repo, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for p in range(2)]
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  assert "mesh: 4 cpu devices over the 'clients' axis, 2 process(es)" in outputs[0]
  for name in ("metrics.jsonl", "metrics.process1.jsonl"):
    assert_rows_close(metrics_lib.read_rows(os.path.join(workdir, name)), want["rows"])


def test_client_parallelism_zero_picks_the_backend_best(cache_dir):
  from softjax.run import runner as runner_lib

  assert schedule.default_parallelism("cpu", 5) == 1
  assert schedule.default_parallelism("gpu", 5) == schedule.default_parallelism("tpu", 5) == 5
  config = run_config(cache_dir)  # K = 3, fl.client_parallelism = 0 by default
  assert config.fl.client_parallelism == 0
  pick = runner_lib.client_parallelism
  mesh = placement.make_mesh(2, placement.CLIENTS)
  assert [pick(config, None, False, b) for b in ("cpu", "gpu")] == [1, 3]
  assert pick(config, mesh, False, "gpu") == 2  # 3 clients padded to 4 slots, 2 a device
  assert pick(config, mesh, True, "gpu") == 3  # a sweep member trains all of its clients
  config.fl.client_parallelism = 2
  assert pick(config, None, False, "cpu") == 2


@pytest.mark.slow
@pytest.mark.parametrize("extra", [{"server.optimizer": "fedadam", "server.lr": 0.05},
                                   {"fl.scaffold": True, "controller.name": "fixed"}],
                         ids=["fedadam", "scaffold"])
def test_drift_control_state_runs_in_a_sharded_sweep(cache_dir, tmp_path, extra):
  # FedAdam's moments are replicated state; SCAFFOLD's client controls are split along N like
  # the residuals; in a sweep each member has its own.
  from softjax.run import experiment

  sweep = {"sweep.zeta": "0,0.1", "sweep.mode": "zip"}
  want = experiment.run(run_config(cache_dir, **sweep, **extra), str(tmp_path / "one"))
  got = experiment.run(run_config(cache_dir, **sweep, **extra, **{"mesh.devices": 2}),
                       str(tmp_path / "mesh"))
  assert got["devices"] == 2 and got["round_traces"] == 1
  assert_rows_close(got["rows"], want["rows"])
  same_controller = {k: v for k, v in extra.items() if k == "controller.name"}
  plain = experiment.run(run_config(cache_dir, **sweep, **same_controller),
                         str(tmp_path / "plain"))
  assert [r["train_loss"] for r in plain["rows"]][2:] != [r["train_loss"] for r in want["rows"]][2:]


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["fedsa", "fedex", "flora", "hetlora"])
def test_a_rules_state_on_a_padded_mesh_with_a_host_store_equals_one_device(cache_dir, tmp_path,
                                                                            rule):
  # FedSA-LoRA's per-client B, split along N on the mesh or kept on the host; FedEx-LoRA's
  # folds, replicated (its padded slots must fold nothing); HetLoRA's ranks follow the client
  # id, not its slot.
  from softjax.run import experiment

  dense = {"method.name": "dense", "method.keep_ratio": 1.0, "method.zeta": 0.0,
           "controller.name": "fixed", "method.rule": rule,
           "method.client_ranks": "1,3,2" if rule == "hetlora" else ""}
  want = experiment.run(run_config(cache_dir, **dense), str(tmp_path / "one"))
  for name, extra in (("mesh", {"mesh.devices": 4}),
                      ("host", {"mesh.devices": 4, "fl.client_store": "host"})):
    got = experiment.run(run_config(cache_dir, **dense, **extra), str(tmp_path / name))
    assert got["devices"] == 4 and got["round_traces"] == 1
    assert_rows_close(got["rows"], want["rows"])
