"""The per-round latency controller (controller.py), the offline plan, the pilot spectrum, and
the method-specific payload prices the controller uses."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from softjax import config as config_lib
from softjax.data import batching
from softjax.federated import round as round_lib
from softjax.federated import schedule
from softjax.federated import types as fl_types
from softjax.models import lora as lora_lib
from softjax.sparsify import payload
from softjax.sparsify import sparsifier as sparsifiers
from softjax.tsfa import controller as controller_lib
from softjax.tsfa import offline, online, pilot, solvers
from softjax.wireless import channel as channel_lib
from softjax.wireless import link as link_lib
from tests import support
from tests.support import (
  HEAD,
  LAYERS,
  RANK,
  K,
  N,
  bits_at,
  controller_state,
  make_controller,
  make_link,
)


def test_channel_config_converts_units():
  w = config_lib.base_config().wireless
  cfg = link_lib.channel_config(w)
  assert cfg.bandwidth_hz == 20e6
  assert cfg.device_flops_range == (2000e9, 6000e9)
  assert cfg.tx_power_dbm == 23.0 and cfg.noise_psd_dbm_hz == -174.0


def test_fixed_controller_sends_the_configured_ratio_on_an_equal_split():
  ctrl = make_controller("fixed", fixed_keep_ratio=0.5)
  clients = schedule.sample_clients(0, 3, N, K)
  plan, _ = ctrl.plan(controller_state(), 3, clients, None)
  assert plan.keep_ratio == 0.5 and plan.m == 4 and plan.solver == "equal"
  np.testing.assert_allclose(plan.bandwidth_hz, np.full(K, 1e6 / K))
  # The channel is that of round 3 for exactly these clients.
  g = channel_lib.fading(N, 0, 3)[clients]
  np.testing.assert_allclose(plan.snr_coeff,
                             channel_lib.snr_coefficient_hz(ctrl.link.beta[clients], g,
                                                         ctrl.link.channel))
  want = link_lib.round_latency_s(np.full(K, bits_at(0.5)), plan.bandwidth_hz, plan.snr_coeff,
                                  plan.compute_s)
  assert plan.predicted_latency_s == pytest.approx(want)


@pytest.mark.parametrize("solver", ["cvx", "numpy"])
def test_osfa_plan_is_the_p3_decision(solver):
  ctrl = make_controller("osfa", solver=solver, V=1.0)
  clients = schedule.sample_clients(0, 7, N, K)
  scores = [1.0 / np.arange(1, RANK + 1)] * len(LAYERS)
  plan, _ = ctrl.plan(controller_state(queue=2.0), 7, clients, scores)
  want = online.solve_with_fallback(
      online.P3Problem(range(1, RANK + 1), functools.partial(online.phi_from_scores, scores), 1.0,
                       2.0, ctrl.tbar_s, lambda m: bits_at(m / RANK), plan.snr_coeff,
                       plan.compute_s), total_bw_hz=1e6, primary="numpy")
  assert plan.m == want.m and plan.keep_ratio == want.m / RANK
  np.testing.assert_allclose(plan.bandwidth_hz, want.bandwidth_hz, rtol=2e-3)
  assert plan.solver == solver and plan.fallbacks == 0
  assert plan.bandwidth_hz.sum() <= 1e6 * (1 + 1e-6)


def test_tsfa_sends_o0_in_round_0_then_solves_p3():
  ctrl = make_controller("tsfa", first_keep_ratio=0.25, solver="numpy")
  first, state = ctrl.plan(controller_state(), 0, schedule.sample_clients(0, 0, N, K), None)
  assert first.keep_ratio == 0.25 and first.m == 2 and first.solver == "numpy"
  # With an empty queue P3 ignores latency and sends everything (Phi = 1 - m / r at B = 0).
  later, _ = ctrl.plan(state, 1, schedule.sample_clients(0, 1, N, K), None)
  assert later.m == RANK and later.keep_ratio == 1.0


def test_plan_and_observe_are_pure_functions_of_the_state():
  ctrl = make_controller("osfa", solver="numpy")
  start = controller_lib.init_state()
  state = ctrl.observe(start, 3.0 * ctrl.tbar_s)
  assert float(state.queue) == pytest.approx(2.0) and float(start.queue) == 0.0  # not mutated
  state = ctrl.observe(state, 0.5 * ctrl.tbar_s)
  assert float(state.queue) == pytest.approx(1.5) and state.queue.dtype == np.float64
  # Another controller object given the same state decides the same; the state is all there is.
  other = make_controller("osfa", solver="numpy")
  clients = schedule.sample_clients(0, 4, N, K)
  (a, sa), (b, sb) = ctrl.plan(state, 4, clients, None), other.plan(state, 4, clients, None)
  assert a.m == b.m and sa == sb
  np.testing.assert_array_equal(a.bandwidth_hz, b.bandwidth_hz)
  # The queue weighs latency: an empty queue decides differently from a long one here.
  assert ctrl.plan(start, 4, clients, None)[0].m != a.m


def test_a_failing_solver_is_counted_and_the_controller_goes_on(monkeypatch):
  def broken(self, bits, snr_coeff, compute_s):
    raise RuntimeError("injected")

  monkeypatch.setattr(solvers.MinLatencyProblem, "solve", broken)
  ctrl = make_controller("osfa", solver="cvx")
  plan, state = ctrl.plan(controller_state(queue=1.0, fallbacks=3), 2,
                          schedule.sample_clients(0, 2, N, K), None)
  assert plan.solver == "numpy" and plan.fallbacks == 1 and state.fallbacks == 4
  assert np.isfinite(plan.predicted_latency_s)


def test_long_run_meets_the_latency_budget_with_a_bounded_queue():
  """500 rounds without training: the controller the experiment loop uses, fed fixed scores,
  fresh fading each round; the realized latency (from the plan's bits and split) feeds the
  queue. The time-average latency must land within 5 % of Tbar with a bounded queue."""
  ctrl = make_controller("osfa", solver="numpy", V=1.0)
  scores = [1.0 / np.arange(1, RANK + 1)] * len(LAYERS)
  taus, queues, kept = [], [], []
  rounds, state = 500, controller_lib.init_state()
  for t in range(rounds):
    plan, state = ctrl.plan(state, t, schedule.sample_clients(0, t, N, K), scores)
    assert plan.fallbacks == 0
    tau = link_lib.round_latency_s(np.full(K, bits_at(plan.keep_ratio)), plan.bandwidth_hz,
                                   plan.snr_coeff, plan.compute_s)
    state = ctrl.observe(state, tau)
    queues.append(float(state.queue))
    taus.append(tau)
    kept.append(plan.m)
  ratio = np.mean(taus) / ctrl.tbar_s
  print(f"long run: Tbar {ctrl.tbar_s:.4f} s, mean latency / Tbar {ratio:.4f}, max queue "
        f"{max(queues):.2f}, m counts {np.bincount(kept)[1:]}")
  assert abs(ratio - 1.0) <= 0.05
  assert max(queues) < 20 and queues[-1] / rounds < 0.02
  assert 1 < np.mean(kept) < RANK  # the budget binds: neither always dense nor always m = 1


def test_plan_offline_composes_the_closed_forms():
  link = make_link()
  compute_at = lambda r: np.full(N, 0.1 + 0.001 * r)  # noqa: E731
  rates = offline.approx_rate_bps(link.beta, link.channel, K)
  tbar = 0.4
  plan = offline.plan_offline([2, 4, 8, 16], tbar_s=tbar, compute_s=compute_at,
                           approx_rates_bps=rates, layer_dims=LAYERS, head_params=HEAD,
                           value_bits=32, weights=offline.RankWeights(1.0, 1.0, 0.1))
  for r in (2, 4, 8, 16):
    assert plan.mbar[r] == offline.affordable_components_quantile(
        tbar, compute_at(r), rates, head_bits=32 * HEAD,
        index_bits=payload.worst_case_index_bits(len(LAYERS), r), value_bits=32,
        sum_dims=256 * 12)
  want, values = offline.select_rank([2, 4, 8, 16], plan.mbar.__getitem__, 1.0, 1.0, 0.1)
  assert plan.rank == want and plan.objective == values
  assert plan.keep_ratio == min(1.0, plan.mbar[want] / want)


def _whole_payload(t, clients):
  """A dense upload whose bits differ per client and round (as HetLoRA's and RoLoRA's do)."""
  return (np.asarray(clients) % 3 + 1 + t % 2) * bits_at(1.0) / 3


@pytest.mark.parametrize("mode", ["fixed", "osfa", "tsfa"])
def test_a_whole_upload_gets_only_a_bandwidth_split_for_its_own_payload(mode):
  link = make_link()
  compute = np.random.default_rng(99).uniform(0.1, 0.3, N)
  spec = controller_lib.ControllerSpec(mode=mode, seed=0, tbar_s=0.5, rank=RANK, V=1.0,
                                       solver="numpy", fixed_keep_ratio=0.5,
                                       first_keep_ratio=0.25, clients_per_round=K)
  ctrl = controller_lib.LatencyController(spec, link, compute, bits_at, _whole_payload)
  state = controller_state(queue=3.0)
  for t in (0, 1):
    clients = schedule.sample_clients(0, t, N, K)
    plan, state = ctrl.plan(state, t, clients, None)  # the runner reads no scores for it
    bits = _whole_payload(t, clients)
    assert plan.keep_ratio == 1.0 and plan.m == RANK  # nothing to sparsify, whatever the queue
    if mode == "fixed":
      np.testing.assert_allclose(plan.bandwidth_hz, np.full(K, 1e6 / K))
    else:  # the split of least latency for these clients' own bits
      tau, bandwidth = solvers.min_latency_numpy(bits, plan.snr_coeff, plan.compute_s,
                                                 total_bw_hz=1e6)
      np.testing.assert_allclose(plan.bandwidth_hz, bandwidth, rtol=1e-6)
      assert plan.predicted_latency_s == pytest.approx(tau, rel=1e-6)
    assert plan.predicted_latency_s == pytest.approx(link_lib.round_latency_s(
        bits, plan.bandwidth_hz, plan.snr_coeff, plan.compute_s), rel=1e-9)
  assert not ctrl.reads_scores
  assert make_controller("osfa").reads_scores and not make_controller("fixed").reads_scores


def test_plan_offline_for_a_whole_upload_picks_among_the_ranks_that_fit():
  link = make_link()
  rates = offline.approx_rate_bps(link.beta, link.channel, K)
  compute = np.full(N, 0.1)
  per_component = 128 * 12  # e.g. B's columns only (FFA-LoRA)
  common = dict(tbar_s=0.25, compute_s=compute, approx_rates_bps=rates, layer_dims=LAYERS,
                head_params=HEAD, value_bits=32, weights=offline.RankWeights(1.0, 1.0, 0.1))
  plan = offline.plan_offline([2, 4, 8, 16], whole_upload=per_component, **common)
  mbar = offline.affordable_components_quantile(0.25, compute, rates, head_bits=32 * HEAD,
                                                index_bits=0, value_bits=32,
                                                sum_dims=per_component)
  assert plan.mbar == {r: mbar for r in (2, 4, 8, 16)} and 4 <= mbar < 8
  # Only ranks whose whole upload fits compete; J at them has no sparsification term.
  assert set(plan.objective) == {2, 4} and plan.keep_ratio == 1.0
  want, values = offline.select_rank([2, 4], mbar, 1.0, 1.0, 0.1, r_max=16)
  assert plan.rank == want and plan.objective == values
  # Nothing fits: the smallest candidate.
  tight = offline.plan_offline([2, 4, 8], whole_upload=per_component,
                               **dict(common, tbar_s=0.1 + 1e-4))
  assert tight.rank == 2 and tight.keep_ratio == 1.0


@pytest.mark.parametrize("name", sparsifiers.METHODS)
def test_predicted_bits_equal_what_the_round_reports(name):
  """The controller prices uploads on the host with the bits the jitted round will report."""
  apply_fn, frozen, state, data = support.tiny_setup()
  head_params = sum(int(np.size(x)) for x in jax.tree.leaves(state.trainable.head))
  method = sparsifiers.make_sparsifier(name, error_feedback=False)
  round_fn = jax.jit(round_lib.make_round(apply_fn, optimizer="sgd", local_steps=1, batch_size=4,
                                          client_parallelism=1, sparsifier=method,
                                          head_params=head_params))
  for keep_ratio in ([1.0] if name == "dense" else [0.25, 0.5, 0.75, 1.0]):
    _, metrics = round_fn(state, frozen, data, jnp.array([0, 2], jnp.int32), jax.random.key(0),
                          fl_types.make_hparams(0.05, 0.0, keep_ratio))
    want = payload.predicted_upload_bits(name, state.trainable.lora, keep_ratio,
                                             value_bits=32, head_params=head_params)
    np.testing.assert_array_equal(np.asarray(metrics.client_bits), [want, want])


def test_round_latency_in_jit_equals_the_host_formula():
  apply_fn, frozen, state, data = support.tiny_setup()
  round_fn = jax.jit(round_lib.make_round(apply_fn, optimizer="sgd", local_steps=1,
                                          batch_size=4, client_parallelism=1, head_params=55))
  uplink = (np.array([2e5, 5e4]), np.array([3e7, 1e6]), np.array([0.2, 0.05]))
  hp = fl_types.make_hparams(0.05, uplink=uplink)
  _, m = round_fn(state, frozen, data, jnp.array([1, 3], jnp.int32), jax.random.key(0), hp)
  want = link_lib.client_latencies_s(np.asarray(m.client_bits), *uplink)
  np.testing.assert_allclose(np.asarray(m.client_latency_s), want, rtol=1e-5)
  # A new split, new channel and new compute times reuse the compiled round.
  before = round_fn._cache_size()
  uplink2 = tuple(2 * x for x in uplink)
  round_fn(state, frozen, data, jnp.array([0, 2], jnp.int32), jax.random.key(0),
           fl_types.make_hparams(0.01, 0.2, 0.5, uplink2))
  assert round_fn._cache_size() == before


@pytest.mark.slow
def test_pilot_gradient_is_the_full_weight_gradient():
  """With B = 0, dL/dB = s * G A^T for G = dL/dW [d_out, d_in]: the LoRA factor gradient checks
  the full-weight gradient the pilot spectrum is made of."""
  apply_fn, frozen, state, data = support.tiny_setup()
  zero_b = _with_zero_b(state.trainable.lora)
  trainable = fl_types.Trainable(zero_b, state.trainable.head)
  images, labels = pilot.pilot_batch(data, 2, 4)
  assert images.shape[0] == 8
  grads = pilot.kernel_gradients(apply_fn, frozen, trainable, images, labels)

  def loss_b(lora_tree):
    logits = apply_fn(frozen, fl_types.Trainable(lora_tree, trainable.head),
                      batching.preprocess(images))
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  grad_lora = jax.grad(loss_b)(zero_b)
  scale = 4.0 / 4  # tiny_setup: alpha 4, rank 4
  for (path, pair), g in zip(lora_lib.lora_layers(zero_b), grads):
    got = dict(lora_lib.lora_layers(grad_lora))[path]["B"]
    np.testing.assert_allclose(np.asarray(got), scale * g @ np.asarray(pair["A"]).T,
                               rtol=1e-4, atol=1e-6)
  s = pilot.pooled_singular_values(grads)
  assert s.shape == (16,) and np.all(np.diff(s) <= 1e-12)
  np.testing.assert_allclose(np.sum(s ** 2), 1.0)


def _with_zero_b(lora_tree):
  """The same tree with every B factor zero (the adapter at initialization)."""
  if lora_lib.is_factor_pair(lora_tree):
    return {"A": lora_tree["A"], "B": jnp.zeros_like(lora_tree["B"])}
  return {k: _with_zero_b(v) for k, v in lora_tree.items()}
