"""federated/server_opt.py: each server optimizer by hand, inside the round, in a resumed run
and in the config checks."""

import math
import os

import chex
import jax
import jax.numpy as jnp
import pytest

from softjax import config as config_lib
from softjax import errors
from softjax.federated import server_opt
from softjax.run import experiment
from softjax.run import metrics as metrics_lib
from tests.support import comparable, make_config


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
  config = config_lib.load("configs/quickstart.py").unlock()
  section, leaf = field.split(".")
  config[section][leaf] = value
  with pytest.raises(errors.ConfigError, match=line):
    config_lib.validate(config)


def test_reorthogonalize_with_a_server_optimizer_is_refused():
  config = config_lib.load("configs/quickstart.py").unlock()
  config.method.name, config.method.keep_ratio = "soft", 0.5
  config.method.reorthogonalize, config.server.optimizer = True, "fedadam"
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
  from softjax.federated import types as fl_types

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
