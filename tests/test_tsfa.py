"""TSFA (ALGORITHM.md 5, 6): offline closed forms, rank selection, the latency solvers, P3 and
its fallback chain. The long simulated run is in support.py (it drives the controller
the experiment loop uses)."""

import functools
import math

import numpy as np
import pytest

from softjax.sparsify import payload
from softjax.tsfa import offline, online, solvers
from softjax.wireless import channel as channel_lib
from softjax.wireless import link as link_lib

CFG = channel_lib.ChannelConfig()


def _instance(k, seed, deep_fades=0, idle=0, cfg=CFG):
  """Random round: K clients of a placed population, Rayleigh fading, a few deep fades (g =
  1e-3) and `idle` clients with nothing to send."""
  rng = np.random.default_rng(seed)
  beta = channel_lib.large_scale_gain(channel_lib.place_clients(k, cfg, seed), cfg, seed)
  g = rng.exponential(size=k)
  g[rng.choice(k, deep_fades, replace=False)] = 1e-3
  a = channel_lib.snr_coefficient_hz(beta, g, cfg)
  bits = rng.uniform(0.5, 1.5, k) * 9.4e6  # around a ViT-B/16 rank-8 q,v upload
  if idle:
    bits = rng.uniform(0.05, 20.0, k) * 1e6  # and a wider spread of payloads
    bits[rng.choice(k, idle, replace=False)] = 0.0
  compute = rng.uniform(0.1, 2.0, k)
  return bits, a, compute


# ------------------------------------------------------------------------------- offline stage


def test_approx_rate_closed_form():
  beta = np.array([1e-10, 1e-12])
  k, b, p, n0 = 10, CFG.bandwidth_hz, CFG.tx_power_w, CFG.noise_psd_w_hz
  expected = (b / k) * np.log2(1 + k * p * beta / (b * n0))
  np.testing.assert_allclose(offline.approx_rate_bps(beta, CFG, k), expected, rtol=1e-12)


def test_affordable_components_and_initial_keep_ratio_by_hand():
  # ((2 - 1) s * 1 Mbit/s - 10000 - 2000) / (32 * 1000) = 988000 / 32000 = 30.875 -> 30.
  assert offline.affordable_components(2.0, 1.0, 1e6, 1e4, 2e3, 32, 1000) == 30
  assert offline.affordable_components(1.0, 1.0, 1e6, 0, 0, 32, 1000) == 0  # no time left
  assert offline.affordable_components(1.01, 1.0, 1e6, 1e5, 0, 32, 1000) == 0  # head does not fit
  assert offline.initial_keep_ratio(30, 8) == 1.0
  assert offline.initial_keep_ratio(3, 8) == 0.375
  assert offline.initial_keep_ratio(0, 8) == 0.0
  # Median client of three with budgets (2 - c) R = 1.0, 0.5, 3.0 Mbit -> 31, 15, 93 components.
  mbar = offline.affordable_components_quantile(2.0, [1.0, 1.5, 1.0], [1e6, 1e6, 3e6], head_bits=0,
                                             index_bits=0, value_bits=32, sum_dims=1000)
  assert mbar == 31


def test_worst_case_index_bits_uses_the_payload_accounting():
  # r = 8: a list costs 3 bits per index, capped by the 8-bit bitmap; r = 4: 2 bits, cap 4.
  assert payload.worst_case_index_bits(2, 8) == 16
  assert payload.worst_case_index_bits(3, 4) == 12
  assert payload.worst_case_index_bits(2, 4) == 2 * max(payload.index_bits_per_layer(4, m)
                                                     for m in range(1, 5))


def test_rank_objective_terms_monotone_and_by_hand():
  r_max, mbar = 16, 4
  terms = {r: offline.rank_objective_terms(r, mbar, r_max, gamma=1.0) for r in range(1, r_max + 1)}
  rho = np.array([terms[r][0] for r in terms])
  eps = np.array([terms[r][1] for r in terms])
  kappa = np.array([terms[r][2] for r in terms])
  assert np.all(np.diff(rho) < 0) and rho[-1] == pytest.approx(0.0)
  assert np.all(eps[:mbar] == 0) and np.all(np.diff(eps[mbar - 1:]) > 0)
  assert np.all(np.diff(kappa) > 0) and kappa[-1] == 1.0
  # By hand, gamma = 1, r_max = 4: energies (1, 1/2, 1/3, 1/4) / (25/12). At r = 3 with
  # mbar = 1: rho = (1/4) * 12/25 = 0.12, eps_sp = (1/2 + 1/3) * 12/25 = 0.4, kappa = 3/4.
  rho3, eps3, kappa3 = offline.rank_objective_terms(3, 1, 4, gamma=1.0)
  assert (rho3, eps3, kappa3) == pytest.approx((0.12, 0.4, 0.75))
  assert offline.rank_objective(3, 1, 1.0, 0.5, 0.2, 4) == pytest.approx(0.12 + 0.2 + 0.15)
  # mbar = 0 still keeps one component (ALGORITHM.md 2.3).
  assert offline.rank_objective_terms(3, 0, 4)[1] == pytest.approx(eps3)


def test_select_rank_returns_the_argmin():
  candidates = [1, 2, 4, 8, 16, 32, 64]
  rbar, values = offline.select_rank(candidates, mbar=6, gamma=1.2, lambda_sp=0.5,
                                  lambda_cov=0.05)
  assert sorted(values) == candidates
  assert values[rbar] == min(values.values())
  for r in candidates:
    assert values[r] == pytest.approx(offline.rank_objective(r, 6, 1.2, 0.5, 0.05, 64))
  # Extremes: no penalties -> the largest rank; a heavy covariance cost -> the smallest.
  assert offline.select_rank(candidates, 6, 1.2, 0.0, 0.0)[0] == 64
  assert offline.select_rank(candidates, 6, 1.2, 0.5, 10.0)[0] == 1
  # mbar may depend on the rank (index bits); a pilot spectrum replaces the power law.
  rbar_fn, _ = offline.select_rank(candidates, lambda r: 6, 1.2, 0.5, 0.05)
  assert rbar_fn == rbar
  sv = np.arange(1, 65, dtype=float) ** -0.6  # sigma_i^2 = i^-1.2
  rbar_sv, values_sv = offline.select_rank(candidates, 6, None, 0.5, 0.05, singular_values=sv)
  assert rbar_sv == rbar
  assert values_sv == pytest.approx(values)


def test_in_flight_price_of_dropped_components_by_hand():
  # m = min(r, max(1, mbar)); share = min(1, (r / m - 1) / P).
  assert offline.in_flight_share(2, 2, 4.0) == 0.0  # every component fits
  assert offline.in_flight_share(4, 2, 4.0) == pytest.approx(0.25)  # (2 - 1) / 4
  assert offline.in_flight_share(8, 2, 4.0) == pytest.approx(0.75)  # (4 - 1) / 4
  assert offline.in_flight_share(64, 4, 10.0) == 1.0  # (16 - 1) / 10, capped
  assert offline.in_flight_share(8, 0, 14.0) == pytest.approx(0.5)  # one component: 7 / 14
  with pytest.raises(ValueError, match="participations"):
    offline.in_flight_share(8, 2, 0.0)
  # gamma = 1, r_max = 8: energies (1/i) / H_8. At r = 4, mbar = 2: rho = (1/5 + ... + 1/8) / H_8,
  # eps_sp = (1/3 + 1/4) / H_8; the in-flight price takes a quarter of eps_sp.
  h8 = sum(1.0 / i for i in range(1, 9))
  rho, eps = (1 / 5 + 1 / 6 + 1 / 7 + 1 / 8) / h8, (1 / 3 + 1 / 4) / h8
  assert offline.rank_objective(4, 2, 1.0, 1.0, 0.0, 8, participations=4.0) == pytest.approx(
      rho + 0.25 * eps)
  assert offline.rank_objective(4, 2, 1.0, 1.0, 0.0, 8) == pytest.approx(rho + eps)
  # On the K = 10 benchmark task's numbers (mbar 4, P = 80 x 10 / 20 = 40) the dropped price
  # stops at rbar = mbar, the in-flight price goes to 32, where rho has fallen and little of
  # the dropped energy is still in flight at the end.
  candidates = [1, 2, 4, 8, 16, 32, 64]
  assert offline.select_rank(candidates, 4, 1.0, 1.0, 0.1)[0] == 4
  rbar, values = offline.select_rank(candidates, 4, 1.0, 1.0, 0.1, participations=40.0)
  assert rbar == 32 and values[32] < values[64] < values[16]
  # With very many participations every rank's dropped energy arrives: J is rho + kappa.
  long_run = offline.select_rank(candidates, 4, 1.0, 1.0, 0.1, participations=1e9)[1]
  assert long_run[64] == pytest.approx(0.1) and long_run[4] == pytest.approx(
      offline.rank_objective_terms(4, 4, 64)[0] + 0.1 * 4 / 64)


def test_the_run_prices_in_flight_with_its_own_participations():
  from softjax.run import setup as setup_lib
  from tests import support

  config = support.make_testing_config()
  assert setup_lib.participations(config) is None  # the default, dropped
  config = support.with_overrides(config, {"controller.sparsification_cost": "in_flight",
                                           "fl.rounds": 6, "fl.clients_per_round": 3,
                                           "fl.num_clients": 4})
  assert setup_lib.participations(config) == pytest.approx(6 * 3 / 4)


# ------------------------------------------------------------------------------- online stage


def test_queue_update_by_hand():
  assert online.queue_update(0.5, 3.0, 2.0) == pytest.approx(1.0)  # 0.5 + 1.5 - 1
  assert online.queue_update(0.2, 1.0, 2.0) == 0.0  # 0.2 + 0.5 - 1 < 0
  assert online.queue_update(0.0, 2.0, 2.0) == 0.0


def test_phi_from_scores_by_hand():
  layers = [np.array([3.0, 1.0, 2.0]), np.array([0.0, 4.0, 0.0])]
  # Sorted: (3, 2, 1) and (4, 0, 0); total 9 + 4 + 1 + 16 = 30; m = 1 drops 4 + 1 + 0.
  assert online.phi_from_scores(layers, 1) == pytest.approx(5 / 30)
  assert online.phi_from_scores(layers, 0) == pytest.approx(1.0)
  assert online.phi_from_scores(layers, 3) == 0.0
  zeros = [np.zeros(8), np.zeros(8)]
  assert online.phi_from_scores(zeros, 2) == pytest.approx(0.75)


def test_upload_bits_fn_is_the_payload_accounting():
  dims = [(128, 128)] * 4
  bits = payload.upload_bits_fn(dims, 8, 32, 1290)
  assert bits(3) == payload.lora_upload_bits(dims, rank=8, kept=3, value_bits=32,
                                             head_params=1290)


def test_bandwidth_for_rate_inverts_the_rate():
  rng = np.random.default_rng(0)
  a = rng.uniform(1e5, 1e11, 200)
  b_true = rng.uniform(1e3, 2e7, 200)
  rate = link_lib.rate_bps(b_true, a)
  np.testing.assert_allclose(solvers.bandwidth_for_rate(rate, a, 1e3, 2e7), b_true, rtol=1e-9)
  # Beyond what b_max carries -> inf; within what b_min carries -> b_min; no rate -> b_min.
  out = solvers.bandwidth_for_rate([link_lib.rate_bps(2e7, 1e6) * 1.01, 1.0, 0.0], [1e6, 1e6, 1e6],
                                1e3, 2e7)
  assert out[0] == math.inf and out[1] == 1e3 and out[2] == 1e3


def test_twin_by_hand_and_all_clients_finish_together():
  # Two equal clients share 2 MHz: 1 MHz each at SNR 3 is 2 Mbit/s, so 4 Mbit take 2 s.
  tau, b = solvers.min_latency_numpy([4e6, 4e6], [3e6, 3e6], [0.0, 0.0], 2e6)
  assert tau == pytest.approx(2.0, rel=1e-9)
  np.testing.assert_allclose(b, [1e6, 1e6], rtol=1e-8)
  # At the optimum nobody idles: every client not held at b_min ends exactly at tau.
  bits, a, c = _instance(20, seed=3, deep_fades=2)
  tau, b = solvers.min_latency_numpy(bits, a, c, CFG.bandwidth_hz)
  np.testing.assert_allclose(link_lib.client_latencies_s(bits, b, a, c), tau, rtol=1e-7)
  assert b.sum() <= CFG.bandwidth_hz * (1 + 1e-12)
  with pytest.raises(solvers.SolverFailure):
    solvers.min_latency_numpy([1e6, 1e6], [1e6, 0.0], [0.0, 0.0], 2e6)  # no gain, bits to send
  # One client takes the whole band; nobody sending leaves only the compute time.
  assert solvers.min_latency_numpy([4e6], [3e6], [0.5], 1e6)[0] == pytest.approx(2.5)
  assert solvers.min_latency_numpy([0.0, 0.0], [3e6, 1.0], [0.5, 0.7], 1e6)[0] == 0.7


def test_cvx_problem_is_dpp():
  problem = solvers.MinLatencyProblem(10, CFG.bandwidth_hz)
  assert problem.problem.is_dpp()


@pytest.mark.parametrize("k", [10, 100])
def test_cvx_and_twin_agree(k):
  problem = solvers.MinLatencyProblem(k, CFG.bandwidth_hz)
  for seed, deep, idle in [(0, 0, 0), (1, 1, 0), (2, 3, 0), (3, 2, 2)]:
    bits, a, c = _instance(k, seed + 10 * k, deep_fades=deep, idle=idle)
    tau_cvx, b_cvx = problem.solve(bits, a, c)
    tau_np, b_np = solvers.min_latency_numpy(bits, a, c, CFG.bandwidth_hz)
    assert tau_cvx == pytest.approx(tau_np, rel=1e-3)
    assert tau_np <= tau_cvx * (1 + 1e-6)  # the twin is the exact one
    assert b_cvx.sum() <= CFG.bandwidth_hz * (1 + 1e-9)
    assert np.abs(b_cvx - b_np).max() <= 1e-3 * CFG.bandwidth_hz


def test_cvx_resolves_new_parameters_without_rebuilding():
  problem = solvers.MinLatencyProblem(10, CFG.bandwidth_hz)
  compiled = problem.problem
  first = _instance(10, seed=5)
  second = _instance(10, seed=6, deep_fades=1)
  tau1, _ = problem.solve(*first)
  tau2, _ = problem.solve(*second)
  tau1_again, _ = problem.solve(*first)
  assert problem.problem is compiled
  assert abs(tau2 - tau1) > 1e-2 * tau1
  assert tau1 == pytest.approx(solvers.min_latency_numpy(*first, CFG.bandwidth_hz)[0], rel=1e-3)
  assert tau2 == pytest.approx(solvers.min_latency_numpy(*second, CFG.bandwidth_hz)[0], rel=1e-3)
  assert tau1_again == pytest.approx(tau1, rel=1e-6)


def _p3_setup(total_bw_hz, k=5, rank=8):
  cfg = channel_lib.ChannelConfig(bandwidth_hz=total_bw_hz)
  beta = channel_lib.large_scale_gain(channel_lib.place_clients(k, cfg, 0), cfg, 0)
  a = channel_lib.snr_coefficient_hz(beta, 1.0, cfg)
  compute = np.full(k, 0.1)
  bits_fn = payload.upload_bits_fn([(128, 128)] * 12, rank, 32, 1290)
  phi_fn = functools.partial(online.phi_from_scores, [1.0 / np.arange(1, rank + 1)] * 12)
  solver = functools.partial(solvers.min_latency_numpy, total_bw_hz=total_bw_hz)
  return a, compute, bits_fn, phi_fn, solver


def test_p3_dense_when_bandwidth_is_plentiful_sparse_when_scarce():
  tbar, rank = 1.0, 8
  plenty = _p3_setup(1e9)
  m, b, tau, objective = online.solve_p3(
      online.P3Problem(range(1, rank + 1), plenty[3], 1.0, 1.0, tbar, plenty[2], plenty[0],
                       plenty[1]), plenty[4])
  assert m == rank and tau < tbar
  assert objective == pytest.approx(1.0 * plenty[3](m) + tau / tbar)
  scarce = _p3_setup(2e4)
  m, b, tau, _ = online.solve_p3(
      online.P3Problem(range(1, rank + 1), scarce[3], 1.0, 1.0, tbar, scarce[2], scarce[0],
                       scarce[1]), scarce[4])
  assert m == 1 and b.sum() <= 2e4 * (1 + 1e-12)
  # An empty queue ignores latency: the smallest error wins.
  m, *_ = online.solve_p3(
      online.P3Problem(range(1, rank + 1), scarce[3], 1.0, 0.0, tbar, scarce[2], scarce[0],
                       scarce[1]), scarce[4])
  assert m == rank


def test_p3_with_cvx_matches_the_twin():
  a, compute, bits_fn, phi_fn, solver = _p3_setup(1e6)
  problem = solvers.MinLatencyProblem(5, 1e6)
  # V = 3, Q = 1, Tbar = 0.3 s: each extra component costs ~0.044 s of latency (0.146 in the
  # objective) and saves 3 * dPhi = 0.49, 0.22, 0.12, ...: the optimum is m = 3.
  p3 = online.P3Problem(range(1, 9), phi_fn, 3.0, 1.0, 0.3, bits_fn, a, compute)
  m_np, _, tau_np, obj_np = online.solve_p3(p3, solver)
  m_cvx, _, tau_cvx, obj_cvx = online.solve_p3(p3, problem.solve)
  assert m_cvx == m_np == 3
  assert tau_cvx == pytest.approx(tau_np, rel=1e-3)
  assert obj_cvx == pytest.approx(obj_np, rel=1e-3)


def test_fallback_chain(monkeypatch):
  a, compute, bits_fn, phi_fn, _ = _p3_setup(1e6)
  problem = solvers.MinLatencyProblem(5, 1e6)
  p3 = online.P3Problem(range(1, 9), phi_fn, 0.5, 2.0, 0.3, bits_fn, a, compute)
  ok = online.solve_with_fallback(p3, total_bw_hz=1e6, cvx_problem=problem)
  assert (ok.solver, ok.fallbacks) == ("cvx", 0)

  def boom(*unused_args, **unused_kwargs):
    raise RuntimeError("injected failure")

  monkeypatch.setattr(problem, "solve", boom)
  twin = online.solve_with_fallback(p3, total_bw_hz=1e6, cvx_problem=problem)
  assert (twin.solver, twin.fallbacks) == ("numpy", 1)
  assert "injected failure" in twin.errors[0]
  assert twin.m == ok.m and twin.tau_s == pytest.approx(ok.tau_s, rel=1e-3)

  monkeypatch.setattr(online, "min_latency_numpy", boom)
  last = online.solve_with_fallback(p3, total_bw_hz=1e6, cvx_problem=problem)
  assert (last.solver, last.fallbacks, last.m) == ("equal", 2, 1)
  np.testing.assert_allclose(last.bandwidth_hz, np.full(5, 2e5))
  assert last.tau_s == pytest.approx(
      link_lib.round_latency_s(np.full(5, bits_fn(1)), np.full(5, 2e5), a, compute))


def test_fallback_never_raises_on_an_infeasible_round():
  a, compute, bits_fn, phi_fn, _ = _p3_setup(1e6)
  a = a.copy()
  a[0] = 0.0  # no gain at all: no solver can serve this client
  problem = solvers.MinLatencyProblem(5, 1e6)
  p3 = online.P3Problem(range(1, 9), phi_fn, 0.5, 2.0, 0.3, bits_fn, a, compute)
  decision = online.solve_with_fallback(p3, total_bw_hz=1e6, cvx_problem=problem)
  assert (decision.solver, decision.fallbacks, decision.m) == ("equal", 2, 1)
  assert decision.tau_s == math.inf
  # Starting at the twin skips CVX.
  decision = online.solve_with_fallback(p3, total_bw_hz=1e6, primary="numpy")
  assert (decision.solver, decision.fallbacks) == ("equal", 1)
