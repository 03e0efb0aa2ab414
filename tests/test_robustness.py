"""E6 channel and client impairments: bursty fading, imperfect CSI, dropouts mid-round."""

import chex
import jax
import jax.numpy as jnp
import numpy as np

from softjax.federated import client as client_lib
from softjax.federated import round as round_lib
from softjax.federated import schedule
from softjax.federated import types as fl_types
from softjax.sparsify import sparsifier as sparsifiers
from softjax.wireless import channel as channel_lib
from softjax.wireless import link as link_lib
from tests import support


def test_bursts_follow_the_markov_chain():
  bad = channel_lib.burst_states(4000, 30, 0, p_bad=0.1, p_good=0.3)
  assert bad.shape == (30, 4000)
  assert abs(bad.mean() - 0.25) < 0.01  # stationary p_bad / (p_bad + p_good)
  stay = (bad[1:] & bad[:-1]).sum() / bad[:-1].sum()
  assert abs(stay - 0.7) < 0.02  # P(bad -> bad) = 1 - p_good
  np.testing.assert_array_equal(bad, channel_lib.burst_states(4000, 30, 0, 0.1, 0.3))
  # A longer run has the same first rounds (resuming with more rounds changes no past channel).
  np.testing.assert_array_equal(channel_lib.burst_states(4000, 40, 0, 0.1, 0.3)[:30], bad)


def test_csi_estimate_and_dropouts():
  g = channel_lib.fading(20000, 0, 3)
  np.testing.assert_array_equal(channel_lib.csi_estimate(g, 0.0, 0, 3), g)
  seen = channel_lib.csi_estimate(g, 0.3, 0, 3)
  assert np.all(seen > 0) and np.all(seen >= 0.1 * g - 1e-12)
  ratio = seen / g - 1.0
  assert abs(ratio.mean()) < 0.01 and abs(ratio.std() - 0.3) < 0.01
  assert not channel_lib.dropouts(100, 0.0, 0, 1).any()
  assert abs(channel_lib.dropouts(20000, 0.2, 0, 1).mean() - 0.2) < 0.01


def test_bursty_link_attenuates_bad_rounds():
  link = support.make_link()
  bad = channel_lib.burst_states(len(link.beta), 5, 0, 0.5, 0.5)
  attenuation = np.where(bad, 0.01, 1.0)
  bursty = link_lib.Link(link.channel, link.beta, link.speeds, attenuation)
  for t in range(5):
    np.testing.assert_allclose(bursty.gains(0, t), link.gains(0, t) * attenuation[t])


def test_imperfect_csi_plans_with_the_estimate_but_reports_the_truth():
  link = support.make_link()
  noisy = link_lib.Link(link.channel, link.beta, link.speeds, csi_error=0.5)
  clients = schedule.sample_clients(0, 2, support.N, support.K)
  exact = support.make_controller("fixed", link=link).plan(
      support.controller_state(), 2, clients, None)[0]
  blurred = support.make_controller("fixed", link=noisy).plan(
      support.controller_state(), 2, clients, None)[0]
  np.testing.assert_array_equal(exact.snr_coeff, blurred.snr_coeff)  # the true channel
  assert exact.predicted_latency_s != blurred.predicted_latency_s  # planned on g_hat


def test_a_lost_upload_is_left_out_and_kept_as_residual():
  apply_fn, frozen, state, data = support.tiny_setup()
  state = fl_types.init_state(state.trainable.lora, state.trainable.head, 4, True)
  method = sparsifiers.make_sparsifier("soft")
  round_fn = jax.jit(round_lib.make_round(apply_fn, optimizer="sgd", local_steps=2,
                                          batch_size=4, client_parallelism=1, sparsifier=method))
  link = (np.full(3, 1e5), np.full(3, 1e7), np.full(3, 0.1))
  hp = lambda received: fl_types.make_hparams(0.05, 0.0, 0.5, link + (received,))  # noqa: E731
  key = jax.random.key(3)
  lost, m_lost = round_fn(state, frozen, data, jnp.array([0, 1, 3], jnp.int32), key,
                          hp(np.array([1.0, 0.0, 1.0])))
  # The same round with client 1 never sampled: keys follow client ids, so clients 0 and 3
  # train identically, and the server must end in the same place.
  without, _ = round_fn(state, frozen, data, jnp.array([0, 3, 3], jnp.int32), key,
                        hp(np.array([1.0, 1.0, 0.0])))
  chex.assert_trees_all_close(lost.trainable, without.trainable, rtol=1e-6, atol=1e-7)
  assert float(m_lost.client_latency_s[1]) == 0.0 and int(m_lost.client_bits[1]) == 0
  # Client 1 keeps its whole update U = local - global (its old residual was zero).
  update = jax.jit(client_lib.make_client_update(apply_fn, optimizer="sgd", local_steps=2,
                                                batch_size=4))
  local, _ = update(state.trainable, frozen, data, jnp.int32(1),
                    jax.random.fold_in(jax.random.fold_in(key, 0), 1), hp(np.ones(3)))
  whole_u = jax.tree.map(jnp.subtract, local.lora, state.trainable.lora)
  chex.assert_trees_all_close(jax.tree.map(lambda r: r[1], lost.residuals), whole_u,
                              rtol=1e-5, atol=1e-7)


def test_a_round_with_every_upload_lost_keeps_the_model_and_reports_its_loss():
  apply_fn, frozen, state, data = support.tiny_setup()
  clients = jnp.array([0, 2], jnp.int32)
  round_fn = jax.jit(round_lib.make_round(apply_fn, optimizer="sgd", local_steps=2,
                                          batch_size=4, client_parallelism=1))
  lost = fl_types.make_hparams(0.05, uplink=(np.full(2, 1e6), np.full(2, 1e9),
                                              np.full(2, 0.01), np.zeros(2)))
  new_state, metrics = round_fn(state, frozen, data, clients, jax.random.key(0), lost)
  chex.assert_trees_all_equal(new_state.trainable, state.trainable)
  counts = np.asarray(data.counts)[[0, 2]]
  want = np.dot(counts / counts.sum(), np.asarray(metrics.client_loss))
  assert float(metrics.train_loss) > 0
  np.testing.assert_allclose(metrics.train_loss, want, rtol=1e-6)
  np.testing.assert_array_equal(metrics.client_bits, [0, 0])
