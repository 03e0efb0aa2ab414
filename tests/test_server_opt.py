"""Server optimizers (federated/server_opt.py), FedProx and SCAFFOLD: by hand or against a
per-client reference, inside the round, in resumed runs and in the config checks."""

import math
import os

import chex
import jax
import jax.numpy as jnp
import pytest

from softjax import config as config_lib
from softjax import errors
from softjax.federated import server_opt
from softjax.federated import types as fl_types
from softjax.run import experiment
from softjax.run import metrics as metrics_lib
from tests.support import comparable, make_config, quickstart_with


def _steps(tx, x0, aggregates):
  """The server's x after each round whose aggregate (from the current x) is given."""
  x, state, out = jnp.float32(x0), tx.init(jnp.float32(x0)), []
  for agg in aggregates:
    x, state = server_opt.step(tx, x, jnp.float32(agg(x)), state)
    out.append(float(x))
  return out


def test_fedavg_is_the_aggregate_and_fedavgm_by_hand():
  assert server_opt.make("fedavg") is None
  # x = 1, aggregates 0.8 then (from 0.8) 0.7: g = 0.2, then 0.1.
  # m = 0.2, x = 0.8; m = 0.9 * 0.2 + 0.1 = 0.28, x = 0.8 - 0.28 = 0.52.
  tx = server_opt.make("fedavgm", lr=1.0, momentum=0.9)
  got = _steps(tx, 1.0, [lambda x: 0.8, lambda x: 0.7])
  assert got == pytest.approx([0.8, 0.52], abs=1e-6)


@pytest.mark.parametrize("name, v1", [
    # g = 0.2, v_{-1} = tau^2 = 1e-6, b2 = 0.99.
    ("fedadam", 0.99 * 1e-6 + 0.01 * 0.04),
    ("fedyogi", 1e-6 - 0.01 * 0.04 * math.copysign(1.0, 1e-6 - 0.04)),
    ("fedadagrad", 1e-6 + 0.04),
])
def test_adaptive_optimizers_by_hand(name, v1):
  tx = server_opt.make(name, lr=0.1, b1=0.9, b2=0.99, tau=1e-3)
  m1 = 0.1 * 0.2  # (1 - b1) g, no bias correction
  (x1,) = _steps(tx, 1.0, [lambda x: 0.8])
  assert x1 == pytest.approx(1.0 - 0.1 * m1 / (math.sqrt(v1) + 1e-3), rel=1e-5)


def test_adaptive_state_is_per_leaf_moments():
  tx = server_opt.make("fedadam", lr=0.1)
  params = {"a": jnp.ones((2, 3)), "b": jnp.zeros((4,))}
  state = tx.init(params)
  chex.assert_trees_all_equal_shapes(state.m, params)
  chex.assert_trees_all_close(state.v["a"], jnp.full((2, 3), 1e-6))


@pytest.fixture(scope="module")
def fedadam_run(cache_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("fedadam"))
  config = make_config(cache_dir, **{"server.optimizer": "fedadam", "server.lr": 0.05})
  return workdir, experiment.run(config, workdir)


@pytest.mark.slow
def test_a_fedadam_run_resumes_to_identical_metrics(fedadam_run, cache_dir, tmp_path):
  full_dir, full = fedadam_run
  assert full["round_traces"] == 1
  config = make_config(cache_dir, **{"server.optimizer": "fedadam", "server.lr": 0.05})
  workdir = str(tmp_path / "resumed")

  def crash_after_round_3(t):
    if t == 3:  # the newest checkpoint is round 2: the moments must come back from it
      raise KeyboardInterrupt

  with pytest.raises(errors.Interrupted):
    experiment.run(config, workdir, on_round_end=crash_after_round_3)
  experiment.run(config, workdir)
  want = metrics_lib.read_rows(os.path.join(full_dir, "metrics.jsonl"))
  got = metrics_lib.read_rows(os.path.join(workdir, "metrics.jsonl"))
  assert comparable(got) == comparable(want)


@pytest.mark.slow
def test_fedavgm_without_momentum_at_lr_one_is_fedavg(cache_dir, tmp_path):
  # x - 1 * (x - x') = x': the same trajectory as plain FedAvg, up to float rounding.
  plain = experiment.run(make_config(cache_dir, rounds=2), str(tmp_path / "plain"))
  step = experiment.run(make_config(cache_dir, rounds=2, **{
      "server.optimizer": "fedavgm", "server.momentum": 0.0}), str(tmp_path / "sgd"))
  losses = lambda s: [r["train_loss"] for r in s["rows"]]  # noqa: E731
  assert losses(step) == pytest.approx(losses(plain), rel=1e-5)


@pytest.mark.parametrize("field, value, line", [
    ("server.optimizer", "fedprox", "server.optimizer.*must be one of fedavg"),
    ("server.lr", float("nan"), "server.lr.*must be a finite number > 0"),
    ("server.b2", 1.0, "server.b2.*must be a finite number in \\[0, 1\\)"),
    ("fl.prox_mu", -0.1, "fl.prox_mu.*must be a finite number >= 0"),
])
def test_bad_server_fields_are_named(field, value, line):
  with pytest.raises(errors.ConfigError, match=line):
    config_lib.validate(quickstart_with({field: value}))


def test_reorthogonalize_with_a_server_optimizer_is_refused():
  config = quickstart_with({"method.name": "soft", "method.keep_ratio": 0.5,
                            "method.reorthogonalize": True, "server.optimizer": "fedadam"})
  with pytest.raises(errors.ConfigError, match="server.optimizer.*method.reorthogonalize"):
    config_lib.validate(config)


def test_the_round_refuses_reorthogonalize_with_a_server_optimizer():
  from softjax.federated import round as round_lib
  from softjax.sparsify import sparsifier
  with pytest.raises(ValueError, match="server optimizer"):
    round_lib.make_phases(lambda *a: None, optimizer="sgd", local_steps=1, batch_size=1,
                          client_parallelism=1, sparsifier=sparsifier.make_sparsifier("soft"),
                          reorthogonalize=True, server_optimizer=server_opt.make("fedadam"))


def test_fedprox_client_steps_against_a_hand_written_reference():
  from softjax.data import batching
  from softjax.federated import client as client_lib

  images = jnp.arange(16, dtype=jnp.uint8).reshape(4, 2, 2, 1) * 15
  labels = jnp.array([0, 1, 1, 0], jnp.int32)
  data = fl_types.FederatedData(images=images, labels=labels,
                                table=jnp.arange(4, dtype=jnp.int32)[None], counts=jnp.array([4]))
  apply_fn = lambda frozen, p, x: x.reshape(x.shape[0], -1) @ p.head["w"]  # noqa: E731
  w0 = fl_types.Trainable(lora={}, head={"w": jnp.full((4, 2), 0.3)})
  hparams = fl_types.make_hparams(client_lr=0.5)
  x, y = batching.gather_batch(images, labels, data.table[0], jnp.arange(4))  # the whole set
  grad = jax.grad(lambda w: client_lib.cross_entropy(x.reshape(4, -1) @ w, y))
  mu, lr = 0.7, 0.5
  # Two SGD steps on F + mu ||w - w0||^2 / 2: the proximal gradient is 0 at w0, then mu (w1 - w0).
  w1 = w0.head["w"] - lr * grad(w0.head["w"])
  w2 = w1 - lr * (grad(w1) + mu * (w1 - w0.head["w"]))
  for m, want in ((mu, w2), (0.0, w1 - lr * grad(w1))):
    update = client_lib.make_client_update(apply_fn, optimizer="sgd", local_steps=2,
                                           batch_size=4, prox_mu=m)
    local, _ = update(w0, {}, data, jnp.int32(0), jax.random.PRNGKey(0), hparams)
    chex.assert_trees_all_close(local.head["w"], want, atol=1e-6)
  assert float(client_lib.proximal_term({"a": jnp.array([3.0, 1.0])},
                                        {"a": jnp.array([1.0, 1.0])})) == 2.0


def _scaffold_reference(update, state, frozen, data, rounds, root, lr, steps):
  """SCAFFOLD (option II) written out per client: y_k from E corrected SGD steps,
  c_k+ = c_k - c + (x - y_k) / (E lr), x += sum p_k (y_k - x), c += sum (c_k+ - c_k) / N."""
  tree = jax.tree.map
  x, c = state.trainable, state.control
  cks = [tree(lambda a, i=i: a[i], state.client_controls) for i in range(data.counts.shape[0])]
  n = len(cks)
  for t, clients in enumerate(rounds):
    round_key = jax.random.fold_in(root, t)
    counts = [float(data.counts[k]) for k in clients]
    p = [m / sum(counts) for m in counts]
    ys, new = [], {}
    for k in clients:
      corr = tree(jnp.subtract, c, cks[k])
      y, _ = update(x, frozen, data, jnp.int32(k), jax.random.fold_in(round_key, k),
                    fl_types.make_hparams(lr), corr)
      ys.append(y)
      new[k] = tree(lambda ck, cc, xx, yy: ck - cc + (xx - yy) / (steps * lr), cks[k], c, x, y)
    x_next = tree(lambda xx, *yy: xx + sum(pk * (yk - xx) for pk, yk in zip(p, yy)), x, *ys)
    c = tree(lambda cc, *d: cc + sum(d) / n, c,
             *[tree(jnp.subtract, new[k], cks[k]) for k in clients])
    for k in clients:
      cks[k] = new[k]
    x = x_next
  return x, c, cks


def test_scaffold_round_equals_the_per_client_reference():
  from softjax.federated import client as client_lib
  from softjax.federated import round as round_lib
  from tests.support import tiny_setup

  apply_fn, frozen, plain, data = tiny_setup()
  state = fl_types.init_state(plain.trainable.lora, plain.trainable.head, num_clients=4,
                              error_feedback=False, scaffold=True)
  lr, steps, root = 0.05, 2, jax.random.key(3)
  rounds = [[1, 3], [0, 1]]  # client 1 twice: its correction is non-zero the second time
  round_fn = jax.jit(round_lib.make_round(apply_fn, optimizer="sgd", local_steps=steps,
                                          batch_size=4, client_parallelism=1, scaffold=True))
  got = state
  for clients in rounds:
    got, metrics = round_fn(got, frozen, data, jnp.array(clients, jnp.int32), root,
                            fl_types.make_hparams(lr))
  update = jax.jit(client_lib.make_client_update(apply_fn, optimizer="sgd", local_steps=steps,
                                                batch_size=4))
  x, c, cks = _scaffold_reference(update, state, frozen, data, rounds, root, lr, steps)
  chex.assert_trees_all_close(got.trainable, x, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(got.control, c, rtol=1e-5, atol=1e-6)
  for k in range(4):
    chex.assert_trees_all_close(jax.tree.map(lambda a: a[k], got.client_controls), cks[k],
                                rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(jax.tree.leaves(c)[0]).max()) > 0  # the controls really moved
  # Each client also uploads its control delta: one 32-bit value per trained value.
  values = sum(a.size for a in jax.tree.leaves(state.trainable))
  _, dense = jax.jit(round_lib.make_round(apply_fn, optimizer="sgd", local_steps=steps,
                                          batch_size=4, client_parallelism=1))(
      plain, frozen, data, jnp.array([0, 1], jnp.int32), root, fl_types.make_hparams(lr))
  chex.assert_trees_all_equal(metrics.client_bits, dense.client_bits + 32 * values)


@pytest.mark.parametrize("overrides, line", [
    ({"fl.scaffold": True, "fl.client_optimizer": "adam"}, "fl.scaffold.*client_optimizer=sgd"),
    ({"fl.scaffold": True, "controller.name": "tsfa", "method.name": "soft"},
     "fl.scaffold.*controller.name=fixed, not tsfa"),
    ({"fl.scaffold": True, "method.name": "soft", "method.keep_ratio": 0.5,
      "method.reorthogonalize": True}, "fl.scaffold.*method.reorthogonalize"),
])
def test_scaffold_combinations_it_cannot_run_are_refused(overrides, line):
  with pytest.raises(errors.ConfigError, match=line):
    config_lib.validate(quickstart_with(overrides))


@pytest.mark.slow
def test_a_scaffold_run_resumes_to_identical_metrics(cache_dir, tmp_path):
  config = make_config(cache_dir, **{"fl.scaffold": True})
  full = experiment.run(config, str(tmp_path / "full"))
  assert full["round_traces"] == 1
  workdir = str(tmp_path / "resumed")

  def crash_after_round_3(t):
    if t == 3:
      raise KeyboardInterrupt

  with pytest.raises(errors.Interrupted):
    experiment.run(config, workdir, on_round_end=crash_after_round_3)
  experiment.run(config, workdir)
  want = metrics_lib.read_rows(os.path.join(tmp_path / "full", "metrics.jsonl"))
  got = metrics_lib.read_rows(os.path.join(workdir, "metrics.jsonl"))
  assert comparable(got) == comparable(want)
