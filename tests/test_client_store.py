"""The host client store (federated/client_store.py): lazy change of basis against the eager
one, a host-store round against the device-store round, and runs that use it."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softjax.federated import client_store
from softjax.federated import round as round_lib
from softjax.federated import types as fl_types
from softjax.sparsify import reorthogonalize as reorth
from softjax.sparsify import sparsifier as sparsifiers
from tests.support import make_config, tiny_setup

N, R, D = 6, 3, 5


def _random_residuals(rng, n=N):
  return {"l0": {"A": rng.normal(size=(n, R, D)).astype(np.float32),
                 "B": rng.normal(size=(n, D + 1, R)).astype(np.float32)},
          "l1": {"A": rng.normal(size=(n, R, D + 2)).astype(np.float32),
                 "B": rng.normal(size=(n, D, R)).astype(np.float32)}}


def _random_bases(rng):
  bases = []
  for _ in range(2):
    h = np.eye(R) + 0.3 * rng.normal(size=(R, R))
    bases.append(reorth.Basis(H=h.astype(np.float32), H_inv=np.linalg.inv(h).astype(np.float32)))
  return bases


def test_lazy_change_of_basis_equals_moving_every_row_each_round():
  rng = np.random.default_rng(0)
  eager = jax.tree.map(np.copy, _random_residuals(rng))
  store = client_store.MemberStore({"residuals": eager}, lazy_basis=True)
  store.start(0)
  # Round t samples `ids`, writes new rows for them (in the new basis), then every row moves.
  schedule = [[0, 1], [2, 3], [0, 4], [5, 1], [2, 0]]
  for ids in schedule:
    ids = np.asarray(ids)
    got = store.gather(ids)["residuals"]
    chex.assert_trees_all_close(got, jax.tree.map(lambda x: x[ids], eager), rtol=1e-4,
                                atol=1e-5)
    bases = _random_bases(rng)
    fresh = _random_residuals(rng, n=len(ids))
    eager = jax.tree.map(lambda all_r, r: all_r.copy(), eager, eager)
    jax.tree.map(lambda all_r, r: all_r.__setitem__(ids, r), eager, fresh)
    eager = jax.tree.map(np.asarray, reorth.change_basis(eager, bases))
    moved = jax.tree.map(np.asarray, reorth.change_basis(fresh, bases))
    store.scatter(ids, {"residuals": moved, "client_controls": (), "client_factors": ()},
                  [(b.H, b.H_inv) for b in bases])
  # Client 3 was last written in round 2 of 5: its row is four bases behind until materialized.
  assert store.epoch[3] == 2 and store.current == 5
  assert min(store.bases) == 2  # the bases no stored row needs are gone
  rows = store.materialized()["residuals"]
  chex.assert_trees_all_close(rows, eager, rtol=1e-4, atol=1e-5)
  assert not store.bases and set(store.epoch) == {5}


def test_never_written_rows_stay_zero_and_need_no_basis():
  zeros = jax.tree.map(np.zeros_like, _random_residuals(np.random.default_rng(1)))
  store = client_store.MemberStore({"residuals": zeros}, lazy_basis=True)
  store.start(0)
  bases = _random_bases(np.random.default_rng(2))
  rows = jax.tree.map(lambda x: np.ones_like(x[:1]), zeros)
  store.scatter(np.array([4]), {"residuals": rows, "client_controls": (),
                                "client_factors": ()}, [(b.H, b.H_inv) for b in bases])
  got = store.gather(np.array([0, 4]))["residuals"]
  chex.assert_trees_all_equal(jax.tree.map(lambda x: x[0], got),
                              jax.tree.map(lambda x: np.zeros_like(x[0]), zeros))
  chex.assert_trees_all_equal(jax.tree.map(lambda x: x[1], got),
                              jax.tree.map(lambda x: x[0], rows))  # current: no basis applied
  assert list(store.epoch) == [-1, -1, -1, -1, 1, -1] and not store.bases


def _rounds(host: bool, method: str, reorthogonalize: bool, scaffold: bool, rounds,
            rule: str = "fedit"):
  """The final state (per-client stores as all N rows) of a few rounds of one store layout."""
  apply_fn, frozen, plain, data = tiny_setup()
  sparsifier = sparsifiers.make_sparsifier(method)
  state = fl_types.init_state(plain.trainable.lora, plain.trainable.head,
                              num_clients=len(rounds[0]) if host else 4,
                              error_feedback=sparsifier.error_feedback, scaffold=scaffold,
                              personal_b=rule == "fedsa")
  round_fn = jax.jit(round_lib.make_round(
      apply_fn, optimizer="sgd", local_steps=2, batch_size=4, client_parallelism=1,
      sparsifier=sparsifier, reorthogonalize=reorthogonalize, scaffold=scaffold,
      host_store=host, num_clients=4, rule=rule))
  store = None
  if host:
    store = client_store.ClientStore.initial(client_store.fields_of(state), 4, swept=False,
                                             lazy_basis=reorthogonalize)
    store.start(0)
  root, hparams = jax.random.key(5), fl_types.make_hparams(0.05, keep_ratio=0.5)
  for ids in rounds:
    ids = np.asarray(ids, np.int32)
    if host:
      state = state._replace(**store.gather([ids]))
    state, metrics = round_fn(state, frozen, data, jnp.asarray(ids), root, hparams)
    if host:
      # The device held K rows, not N.
      assert jax.tree.leaves(client_store.fields_of(state))[0].shape[0] == len(ids)
      store.scatter([ids], client_store.fields_of(state), metrics.bases)
  if host:
    state = state._replace(**store.materialized())
  return state


@pytest.mark.parametrize("method, reorthogonalize, scaffold, rule", [
    ("soft", True, False, "fedit"), ("tlora", False, False, "fedit"),
    ("dense", False, True, "fedit"), ("dense", False, False, "fedsa")])
def test_host_store_round_equals_the_device_store_round(method, reorthogonalize, scaffold,
                                                        rule):
  rounds = [[1, 3], [0, 1], [2, 1], [3, 0]]  # client 1 three times, client 2 once, late
  device = _rounds(False, method, reorthogonalize, scaffold, rounds, rule)
  host = _rounds(True, method, reorthogonalize, scaffold, rounds, rule)
  chex.assert_trees_all_close(host.trainable, device.trainable, rtol=1e-4, atol=1e-6)
  chex.assert_trees_all_close(host.residuals, device.residuals, rtol=1e-4, atol=1e-6)
  chex.assert_trees_all_close(host.client_controls, device.client_controls, rtol=1e-4,
                              atol=1e-6)
  chex.assert_trees_all_close(host.control, device.control, rtol=1e-4, atol=1e-6)
  chex.assert_trees_all_close(host.client_factors, device.client_factors, rtol=1e-4,
                              atol=1e-6)
  stored = host.residuals or host.client_controls or host.client_factors
  assert float(np.abs(jax.tree.leaves(stored)[0]).max()) > 0  # the rows really moved


def _run(tmp_path, cache_dir, name, rounds, **overrides):
  from softjax.run import experiment
  return experiment.run(make_config(cache_dir, rounds=rounds, **overrides), str(tmp_path / name))


@pytest.mark.parametrize("method", [
    {"method.name": "soft", "method.keep_ratio": 0.5, "method.reorthogonalize": True},
    {"method.name": "dense", "method.rule": "fedsa"}], ids=["soft_reorth", "fedsa"])
def test_a_host_store_run_resumes_and_matches_a_device_store_run(tmp_path, cache_dir, method):
  common = {**method, "checkpoint.every": 2}
  device = _run(tmp_path, cache_dir, "device", 4, **common)
  host = {**common, "fl.client_store": "host"}
  _run(tmp_path, cache_dir, "host", 2, **host)
  # Resumes after round 2 from the host store's checkpoint tree.
  resumed = _run(tmp_path, cache_dir, "host", 4, **host)
  got = [r["train_loss"] for r in resumed["rows"]]
  want = [r["train_loss"] for r in device["rows"]]
  np.testing.assert_allclose(got, want, rtol=1e-4)
  assert resumed["round_traces"] == 1


def test_a_swept_host_store_run_matches_the_device_store_sweep(tmp_path, cache_dir):
  common = {"method.name": "tlora", "method.keep_ratio": 0.5, "sweep.seed": "0,1"}
  device = _run(tmp_path, cache_dir, "device", 3, **common)
  host = _run(tmp_path, cache_dir, "host", 3, **common, **{"fl.client_store": "host"})
  key = lambda r: (r["round"], r["member"])  # noqa: E731
  got = [r["train_loss"] for r in sorted(host["rows"], key=key)]
  want = [r["train_loss"] for r in sorted(device["rows"], key=key)]
  np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("overrides, line", [
    ({"fl.client_store": "disk"}, "fl.client_store.*device, host"),
    ({"fl.client_store": "host", "mesh.distributed": True}, "fl.client_store.*mesh.distributed"),
])
def test_bad_client_store_settings_are_named(overrides, line):
  from softjax import config as config_lib
  from softjax import errors
  from tests.support import quickstart_with
  with pytest.raises(errors.ConfigError, match=line):
    config_lib.validate(quickstart_with(overrides))


def test_a_host_store_device_state_has_k_rows_whatever_n(cache_dir):
  from softjax.run import runner as runner_lib
  from softjax.run import setup as setup_lib
  shapes = {}
  for n in (6, 12):
    config = make_config(cache_dir, **{"method.name": "soft", "method.keep_ratio": 0.5,
                                       "fl.client_store": "host", "fl.num_clients": n})
    shared, members = setup_lib.build_setup(config)
    state = runner_lib.RoundRunner(config, shared, members).initial_state()
    shapes[n] = [x.shape for x in jax.tree.leaves(state.server)]
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state.server))
    rows = jax.tree.leaves(state.clients.materialized()["residuals"])
    assert rows[0].shape[0] == n and isinstance(rows[0], np.ndarray)
    assert jax.tree.leaves(state.server.residuals)[0].shape[0] == 3  # K rows
  assert shapes[6] == shapes[12]
