"""TSFA: the offline stage (rank and initial keep ratio) and the online Lyapunov controller.

Offline (before round 0): with the channel replaced by its mean and the band split equally, a
closed form says how many components per layer a typical client can upload within the budget
(mbar), which fixes the initial keep ratio O_0 = min(1, mbar / r) and, through a model of the
update's spectrum, the rank rbar that minimizes the rank-dependent terms of the bound.

Online (between rounds, host side): a virtual queue tracks how far realized latencies have run
over the budget Tbar; each round the server picks the number of kept components m and the FDMA
bandwidth split by minimizing `V * Phi(m) + Q * tau(m) / Tbar`. For a fixed m the minimum-latency
split is a convex program, solved either by CVXPY (compiled once with parameters, DPP) or by an
exact NumPy twin; a fallback chain keeps a run alive when a solver fails.

Everything is host-side NumPy. Bit counts come from `softjax.payload`, the accounting every
method shares.

References: ALGORITHM.md sections 5 and 6.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Callable, Mapping, Sequence

from absl import logging
import cvxpy as cp
import numpy as np
from scipy import special

from softjax import payload
from softjax import wireless

# [choice] Smallest band a sampled client is given, in Hz. It keeps every client (even one with
# nothing to send) on the air and keeps the solver away from the b -> 0 edge of the rate's domain;
# 1 kHz is far below any share the optimum gives (20 MHz over 100 clients is 200 kHz each).
DEFAULT_B_MIN_HZ = 1e3

SOLVERS = ("cvx", "numpy")  # values of solve_with_fallback(primary=...): where the chain starts
_LN2 = math.log(2.0)
_MEGA = 1e6


class SolverFailure(RuntimeError):
  """A latency solver returned no usable answer (bad status, infeasible, non-finite)."""


# ----------------------------------------------------------------------------------------------
# Offline stage (ALGORITHM.md 5)
# ----------------------------------------------------------------------------------------------


def approx_rate_bps(beta, cfg: wireless.ChannelConfig, clients_per_round: int) -> np.ndarray:
  """Rate on the approximated channel: mean fading, equal split of the band.

  `Rbar_k = (B_tot / K) log2(1 + K p beta_k / (B_tot N0))`, i.e. `wireless.rate_bps` on a band of
  B_tot / K with g = 1.

  Args:
    beta: [N] large-scale gains.
    cfg: the channel config.
    clients_per_round: K.

  Returns:
    [N] rates in bit/s.

  References: ALGORITHM.md section 5, step 1.
  """
  return wireless.rate_bps(cfg.bandwidth_hz / clients_per_round,
                           wireless.snr_coefficient_hz(beta, 1.0, cfg))


def worst_case_index_bits(num_layers: int, rank: int) -> int:
  """Largest index cost of a sparse upload over every m, from the shared payload accounting.

  mbar needs the index bits before m is known; taking their maximum over m (at most a bitmap of r
  bits per layer) keeps the closed form conservative [choice].

  Args:
    num_layers: L, the adapted matrices.
    rank: r.

  Returns:
    Bits.

  References: ALGORITHM.md sections 2.5 and 5, step 2.
  """
  return num_layers * max(payload.index_bits_per_layer(rank, m) for m in range(1, rank + 1))


def affordable_components(tbar_s: float, compute_s_q: float, rate_q: float, head_bits: float,
                          index_bits: float, value_bits: int, sum_dims: int) -> int:
  """Components per layer a client can upload within the budget, in closed form.

  `mbar = floor(((Tbar - c) * Rbar - head_bits - index_bits) / (q * sum_l (d_in + d_out)))`,
  clipped at 0: the bits that fit in the time left after local compute, less the fixed costs,
  divided by the cost of one component in every layer.

  Args:
    tbar_s: latency budget Tbar.
    compute_s_q: compute time c of the reference client.
    rate_q: its approximated rate Rbar in bit/s.
    head_bits: bits of the dense head.
    index_bits: index bits (see `worst_case_index_bits`).
    value_bits: q, bits per value.
    sum_dims: sum_l (d_in_l + d_out_l).

  Returns:
    mbar >= 0 (may exceed r: then the dense upload fits).

  References: ALGORITHM.md section 5, step 2.
  """
  spare_bits = (tbar_s - compute_s_q) * rate_q - head_bits - index_bits
  if not np.isfinite(spare_bits) or spare_bits <= 0:
    return 0
  return int(math.floor(spare_bits / (value_bits * sum_dims)))


def affordable_components_quantile(tbar_s: float, compute_s, rates_bps, *, head_bits: float,
                                   index_bits: float, value_bits: int, sum_dims: int,
                                   quantile: float = 0.5) -> int:
  """mbar of the client at a quantile of the population (default the median).

  [choice] The quantile is taken over the clients' own mbar (equivalently over their bit budgets
  `(Tbar - c_k) Rbar_k`, on which mbar is monotone), not over c and Rbar separately: separate
  quantiles could pair the compute time of one client with the rate of another. The
  "inverted_cdf" quantile returns an actual client's value.

  Args:
    tbar_s: latency budget Tbar.
    compute_s: [N] compute times.
    rates_bps: [N] approximated rates (see `approx_rate_bps`).
    head_bits, index_bits, value_bits, sum_dims: as in `affordable_components`.
    quantile: in [0, 1].

  Returns:
    mbar >= 0.

  References: ALGORITHM.md section 5, step 2.
  """
  compute_s, rates_bps = np.broadcast_arrays(np.asarray(compute_s, np.float64),
                                             np.asarray(rates_bps, np.float64))
  per_client = [affordable_components(tbar_s, c, r, head_bits, index_bits, value_bits, sum_dims)
                for c, r in zip(compute_s.ravel(), rates_bps.ravel())]
  return int(np.quantile(per_client, quantile, method="inverted_cdf"))


def initial_keep_ratio(mbar: int, rank: int) -> float:
  """`O_0(r) = min(1, mbar / r)`; the client then keeps max(1, ceil(O_0 r)) components.

  References: ALGORITHM.md section 5, step 3.
  """
  return min(1.0, mbar / rank)


def spectrum_energies(r_max: int, gamma: float = 1.0, singular_values=None) -> np.ndarray:
  """Normalized energies sigma_i^2 (descending, summing to 1) of the ideal update.

  Either the power law `sigma_i^2 ~ i^-gamma` over i = 1..r_max, or the squares of given singular
  values (the pilot-gradient option: pass the singular values of a full-weight gradient), sorted
  descending and normalized over all of them.

  Args:
    r_max: length of the power-law spectrum (ignored with singular_values).
    gamma: power-law exponent.
    singular_values: optional 1-D array of singular values (not squared).

  Returns:
    1-D energies summing to 1.

  References: ALGORITHM.md section 5, step 4.
  """
  if singular_values is None:
    energies = np.arange(1, r_max + 1, dtype=np.float64) ** (-float(gamma))
  else:
    energies = np.sort(np.asarray(singular_values, np.float64).ravel() ** 2)[::-1]
  total = energies.sum()
  if not total > 0:
    raise ValueError("the spectrum has no energy")
  return energies / total


def rank_objective_terms(r: int, mbar: int, r_max: int, gamma: float = 1.0,
                         singular_values=None) -> tuple[float, float, float]:
  """The three rank-dependent terms of the bound at the initial keep ratio O_0(r).

  Derivation (our reconstruction): a rank-r adapter can at best carry the top r components of
  the ideal update, so
  - rho(r), the rank deficiency, is the energy beyond rank r (decreasing in r);
  - eps_sp(r), the sparsification error, is the energy of the components the client drops when
    it keeps m = min(r, max(1, mbar)) of its r: those ranked m+1..r (0 while r <= mbar, then
    increasing). The max(1, .) follows ALGORITHM.md 2.3, which always keeps one component;
  - kappa(r) = r / r_max [choice: linear covariance cost]: the covariance between separately
    averaged B and A is a sum over components of terms of comparable size, so it grows about
    linearly with the number of components; normalized by r_max to lie in (0, 1].

  Args:
    r: candidate rank.
    mbar: affordable components per layer (`affordable_components`).
    r_max: largest rank considered (normalizes kappa; length of the power-law spectrum).
    gamma: power-law exponent.
    singular_values: optional spectrum (see `spectrum_energies`).

  Returns:
    (rho, eps_sp, kappa).

  References: ALGORITHM.md section 5, step 4.
  """
  energies = spectrum_energies(r_max, gamma, singular_values)
  kept = min(r, max(1, int(mbar)))
  rho = float(energies[r:].sum())
  eps_sp = float(energies[kept:r].sum())
  kappa = r / r_max
  return rho, eps_sp, kappa


def rank_objective(r: int, mbar: int, gamma: float, lambda_sp: float, lambda_cov: float,
                   r_max: int, singular_values=None) -> float:
  """`J(r) = rho(r) + lambda_sp * eps_sp(r) + lambda_cov * kappa(r)`.

  Args:
    r: candidate rank.
    mbar: affordable components per layer.
    gamma: power-law exponent (unused with singular_values).
    lambda_sp: weight of the sparsification error.
    lambda_cov: weight of the covariance cost.
    r_max: largest rank considered.
    singular_values: optional spectrum for the pilot-gradient option.

  Returns:
    J(r).

  References: ALGORITHM.md section 5, step 4.
  """
  rho, eps_sp, kappa = rank_objective_terms(r, mbar, r_max, gamma, singular_values)
  return rho + lambda_sp * eps_sp + lambda_cov * kappa


def select_rank(candidates: Sequence[int], mbar: int | Callable[[int], int], gamma: float = 1.0,
                lambda_sp: float = 1.0, lambda_cov: float = 0.1, r_max: int | None = None,
                singular_values=None) -> tuple[int, dict[int, float]]:
  """`rbar = argmin_r J(r)` over candidate ranks; ties go to the smaller rank (cheaper).

  Args:
    candidates: ranks to compare.
    mbar: affordable components, an int or a function of the rank (its index bits depend on r).
    gamma, lambda_sp, lambda_cov, singular_values: as in `rank_objective`.
    r_max: defaults to max(candidates).

  Returns:
    (rbar, {r: J(r)}).

  References: ALGORITHM.md section 5, step 4.
  """
  ranks = sorted(int(r) for r in candidates)
  if not ranks or ranks[0] < 1:
    raise ValueError(f"candidates must be ranks >= 1, got {list(candidates)}")
  r_max = ranks[-1] if r_max is None else r_max
  mbar_of = mbar if callable(mbar) else (lambda _: mbar)
  values = {r: rank_objective(r, mbar_of(r), gamma, lambda_sp, lambda_cov, r_max, singular_values)
            for r in ranks}
  best = min(ranks, key=lambda r: (values[r], r))
  return best, values


@dataclasses.dataclass(frozen=True)
class OfflinePlan:
  """What the offline stage broadcasts before round 0, and how it got there.

  Attributes:
    rank: rbar, the chosen LoRA rank.
    keep_ratio: O_0(rbar) = min(1, mbar / rbar).
    mbar: {r: affordable components per layer} (depends on r through the index bits).
    objective: {r: J(r)}.
  """

  rank: int
  keep_ratio: float
  mbar: dict[int, int]
  objective: dict[int, float]


def plan_offline(candidates: Sequence[int], *, tbar_s: float, compute_s, approx_rates_bps,
                 layer_dims: Sequence[tuple[int, int]], head_params: int, value_bits: int,
                 quantile: float = 0.5, gamma: float = 1.0, lambda_sp: float = 1.0,
                 lambda_cov: float = 0.1, singular_values=None) -> OfflinePlan:
  """Stage 1 end to end: mbar(r) at the client quantile, rbar = argmin J(r), O_0(rbar).

  Args:
    candidates: ranks to compare.
    tbar_s: the latency budget Tbar.
    compute_s: [N] compute times of all clients, or r -> [N] (the LoRA paths add compute that
      grows with the rank).
    approx_rates_bps: [N] rates on the approximated channel (`approx_rate_bps`).
    layer_dims: (d_in, d_out) of every adapted matrix.
    head_params: head values (sent densely).
    value_bits: q.
    quantile, gamma, lambda_sp, lambda_cov, singular_values: as in
      `affordable_components_quantile` and `select_rank`.

  Returns:
    An OfflinePlan.

  References: ALGORITHM.md section 5, steps 1-5.
  """
  dims = [tuple(d) for d in layer_dims]
  sum_dims = sum(d_in + d_out for d_in, d_out in dims)
  compute_of = compute_s if callable(compute_s) else (lambda _: compute_s)
  mbar = {int(r): affordable_components_quantile(
      tbar_s, compute_of(int(r)), approx_rates_bps, head_bits=value_bits * head_params,
      index_bits=worst_case_index_bits(len(dims), int(r)), value_bits=value_bits,
      sum_dims=sum_dims, quantile=quantile) for r in candidates}
  rbar, objective = select_rank(list(mbar), mbar.__getitem__, gamma, lambda_sp, lambda_cov,
                                singular_values=singular_values)
  return OfflinePlan(rbar, initial_keep_ratio(mbar[rbar], rbar), mbar, objective)


# ----------------------------------------------------------------------------------------------
# Online stage (ALGORITHM.md 6)
# ----------------------------------------------------------------------------------------------


def queue_update(queue: float, tau_s: float, tbar_s: float) -> float:
  """Virtual latency queue, normalized by the budget: `Q' = max(Q + tau / Tbar - 1, 0)`.

  It grows by how far a round overran Tbar and drains when rounds come in under it, so a queue
  that stays bounded means the time-average latency meets the budget.

  References: ALGORITHM.md section 6.
  """
  return max(queue + tau_s / tbar_s - 1.0, 0.0)


def phi_from_scores(scores_per_layer: Sequence[np.ndarray], m: int) -> float:
  """Predicted sparsification error: share of score energy outside each layer's top m.

  `Phi(m) = sum_l sum_{i > m} s_(i)^2 / sum_l sum_i s_i^2`, scores sorted descending within a
  layer. Before the adapter carries energy (all scores 0) it is `1 - m / r`.

  Args:
    scores_per_layer: one [r] array of importance scores per layer.
    m: components kept per layer.

  Returns:
    Phi in [0, 1].

  References: ALGORITHM.md section 6.
  """
  layers = [np.sort(np.abs(np.asarray(s, np.float64)).ravel())[::-1] for s in scores_per_layer]
  rank = max(len(s) for s in layers)
  m = min(max(int(m), 0), rank)
  total = sum(float(np.sum(s ** 2)) for s in layers)
  if not total > 0:
    return 1.0 - m / rank
  dropped = sum(float(np.sum(s[m:] ** 2)) for s in layers)
  return dropped / total


def upload_bits_fn(layer_dims: Sequence[tuple[int, int]], rank: int, value_bits: int,
                   head_params: int) -> Callable[[int], int]:
  """m -> bits one client uploads when it keeps m components per layer (shared accounting).

  References: ALGORITHM.md sections 2.5 and 6.
  """
  dims = [tuple(d) for d in layer_dims]

  def bits(m: int) -> int:
    return payload.lora_upload_bits(dims, rank=rank, kept=int(m), value_bits=value_bits,
                                    head_params=head_params)

  return bits


class MinLatencyProblem:
  """Minimum-latency FDMA bandwidth split for K clients, compiled once by CVXPY (DPP).

  Variables b (MHz), u (s/Mbit) and tau (s):
    minimize tau
    s.t.  u_k >= 1 / R_k(b_k),  R_k(b) = -rel_entr(b, b + a_k) / ln 2 = b log2(1 + a_k / b),
          bits_k u_k <= tau - c_k,   sum_k b_k <= B_tot,   b_k >= b_min.
  Bits (Mbit), a (MHz) and c (s) are parameters. DPP holds because a enters only affinely
  (b + a) inside rel_entr and bits multiplies the variable u directly; no parameter multiplies
  a variable inside a nonlinear atom. Working in MHz and Mbit keeps the cone data near 1
  (ALGORITHM.md 6 notes that unscaled Hz and bits made the solver fail at 100 clients).

  References: ALGORITHM.md section 6.
  """

  def __init__(self, num_clients: int, total_bw_hz: float, b_min_hz: float = DEFAULT_B_MIN_HZ,
               solver: str = "CLARABEL", solver_options: Mapping | None = None):
    """Builds the parametrized problem.

    Args:
      num_clients: K, fixed for the problem's lifetime.
      total_bw_hz: B_tot.
      b_min_hz: smallest band per client.
      solver: CVXPY solver name (default Clarabel).
      solver_options: extra keyword arguments for `Problem.solve` (Clarabel settings among
        them); they override this class's Clarabel default max_step_fraction = 0.9.
    """
    if num_clients * b_min_hz > total_bw_hz:
      raise ValueError(f"{num_clients} clients x b_min {b_min_hz} Hz exceed the band "
                       f"{total_bw_hz} Hz")
    self.num_clients = num_clients
    self.total_bw_hz = float(total_bw_hz)
    self.b_min_hz = float(b_min_hz)
    self.solver = solver
    self.solver_options = {}
    if solver == "CLARABEL":
      # Measured on 300 random rounds (K = 10 and 100, deep fades, SNRs from 1e-2 to 1e8):
      # Clarabel's default step fraction 0.99 stalls ("insufficient progress") on ~7% of the
      # K = 100 rounds; 0.9 solved all of them at the same speed.
      self.solver_options["max_step_fraction"] = 0.9
    self.solver_options.update(solver_options or {})
    self.inaccurate_rtol = 1e-4
    k = num_clients
    self.bandwidth_mhz = cp.Variable(k, name="bandwidth_mhz")
    inv_rate = cp.Variable(k, name="s_per_mbit")
    self.tau = cp.Variable(name="tau_s")
    self.bits_mbit = cp.Parameter(k, nonneg=True, name="bits_mbit")
    self.snr_coeff_mhz = cp.Parameter(k, nonneg=True, name="snr_coeff_mhz")
    self.compute_s = cp.Parameter(k, name="compute_s")
    b = self.bandwidth_mhz
    rate_mbps = -cp.rel_entr(b, b + self.snr_coeff_mhz) / _LN2
    constraints = [
        inv_rate >= cp.inv_pos(rate_mbps),
        cp.multiply(self.bits_mbit, inv_rate) <= self.tau - self.compute_s,
        cp.sum(b) <= self.total_bw_hz / _MEGA,
        b >= self.b_min_hz / _MEGA,
    ]
    self.problem = cp.Problem(cp.Minimize(self.tau), constraints)
    if not self.problem.is_dpp():  # a raise, not an assert: it must hold under python -O too
      raise AssertionError("the minimum-latency problem must be DPP to be compiled once")
    # CVXPY's first solve compiles the problem along a path whose floating-point results differ
    # (by ~1e-7) from every later solve's. Compiling here, on a neutral instance, makes a solve
    # depend only on its inputs, so a resumed run reproduces the uninterrupted run's decisions.
    try:
      self.solve(np.ones(num_clients) * _MEGA, np.ones(num_clients) * 1e3 * _MEGA,
                 np.zeros(num_clients))
    except Exception:  # a broken solver surfaces again on the first real solve, which falls back
      pass

  def solve(self, bits, snr_coeff, compute_s) -> tuple[float, np.ndarray]:
    """Solves for one round's channel and payloads.

    Args:
      bits: [K] upload bits.
      snr_coeff: [K] a_k = p beta_k g_k / N0 in Hz.
      compute_s: [K] compute times.

    Returns:
      (tau_s, bandwidth_hz [K]): the realized round latency of the returned split (recomputed
      from the rate formula, not the solver's objective) and the split.

    Raises:
      SolverFailure: a status other than optimal (optimal_inaccurate passes only when its split
        achieves the latency the solver claims, to 1e-4 relative), or a non-finite answer.
    """
    k = self.num_clients
    bits, snr_coeff, compute_s = (np.broadcast_to(np.asarray(x, np.float64), (k,))
                                  for x in (bits, snr_coeff, compute_s))
    self.bits_mbit.value = bits / _MEGA
    self.snr_coeff_mhz.value = snr_coeff / _MEGA
    self.compute_s.value = compute_s
    with warnings.catch_warnings():
      # CVXPY warns on every inaccurate solve; the check below decides and the caller logs.
      warnings.simplefilter("ignore", UserWarning)
      self.problem.solve(solver=self.solver, **self.solver_options)
    status = self.problem.status
    if status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE) or self.bandwidth_mhz.value is None:
      raise SolverFailure(f"CVXPY status {status}")
    bandwidth = np.maximum(self.bandwidth_mhz.value * _MEGA, self.b_min_hz)
    # The interior-point answer may overshoot the band by its tolerance; the round must not.
    bandwidth *= min(1.0, self.total_bw_hz / bandwidth.sum())
    tau = wireless.round_latency_s(bits, bandwidth, snr_coeff, compute_s)
    if not np.isfinite(tau):
      raise SolverFailure("CVXPY returned a split with infinite latency")
    # Clarabel stops at 'almost solved' (optimal_inaccurate) on some wide-range instances
    # (deep fades next to strong clients) with a gap near 1e-6, far inside what a round needs.
    # Such an answer is kept only if its split really achieves the latency the solver claims.
    claimed = float(self.tau.value)
    if status != cp.OPTIMAL and not abs(tau - claimed) <= self.inaccurate_rtol * tau:
      raise SolverFailure(f"CVXPY status {status}: split gives {tau:.6g} s, solver {claimed:.6g} s")
    return tau, bandwidth

  __call__ = solve


def _rate_slope(b, a):
  """dR/db of `b log2(1 + a / b)`: (ln(1 + x) - x / (1 + x)) / ln 2 with x = a / b (> 0)."""
  x = a / b
  return (np.log1p(x) - x / (1.0 + x)) / _LN2


def bandwidth_for_rate(rate_bps, snr_coeff, b_min_hz: float, b_max_hz: float) -> np.ndarray:
  """Smallest band b in [b_min, b_max] with `b log2(1 + a / b) >= rate`; inf where none exists.

  The rate is increasing in b, so the inverse is unique. With x = a / b the equation reads
  `ln(1 + x) / x = c`, c = rate ln 2 / a in (0, 1), whose nontrivial root is
  `x = -W_{-1}(-c e^{-c}) / c - 1` (Lambert W, lower branch); two Newton steps on the rate itself
  then repair the precision W loses near its branch point (wide bands, x -> 0).

  Args:
    rate_bps: [K] required rates (<= 0 needs only b_min).
    snr_coeff: [K] a_k in Hz (> 0 where the rate is > 0).
    b_min_hz: lower bound on the band.
    b_max_hz: upper bound (the most one client can get).

  Returns:
    [K] bands in Hz (inf where even b_max falls short).

  References: ALGORITHM.md section 6 (the NumPy twin).
  """
  rate, a = np.broadcast_arrays(np.asarray(rate_bps, np.float64),
                                np.asarray(snr_coeff, np.float64))
  with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
    # Clipping c keeps W finite on every entry; the entries it changes are overwritten below.
    c = np.clip(rate * _LN2 / a, 1e-300, 1.0 - 1e-16)
    x = -special.lambertw(-c * np.exp(-c), k=-1).real / c - 1.0
    # x <= 0 only when W lost all precision at its branch point, i.e. a band far wider than
    # b_max; start those at b_max (the reachability test below decides them).
    b = np.where(x > 0, a / x, b_max_hz)
    b = np.clip(np.nan_to_num(b, nan=b_max_hz, posinf=b_max_hz), b_min_hz, b_max_hz)
    for _ in range(2):
      gap = b * np.log1p(a / b) / _LN2 - rate
      b = np.clip(b - gap / _rate_slope(b, a), np.maximum(b_min_hz, 0.5 * b), b_max_hz)
    b = np.nan_to_num(b, nan=b_max_hz)
  b[rate <= 0] = b_min_hz
  b[wireless.rate_bps(b_max_hz, a) < rate] = np.inf
  return b


def min_latency_numpy(bits, snr_coeff, compute_s, total_bw_hz: float,
                      b_min_hz: float = DEFAULT_B_MIN_HZ, rtol: float = 1e-10,
                      max_iter: int = 200) -> tuple[float, np.ndarray]:
  """NumPy twin of `MinLatencyProblem`: a bracketing search on tau with the rate inverse.

  For a trial tau, client k needs the smallest b_k with R_k(b_k) >= bits_k / (tau - c_k); tau is
  feasible iff those bands fit in B_tot. The total need falls as tau grows, so the smallest
  feasible tau is found by bisection on a bracket [lo, hi] that is finite from the start: at lo
  the slowest client would need all the band the others leave it, at hi the equal split is
  feasible. The total need is also convex in tau (the convex increasing inverse of a concave
  rate, composed with bits / (tau - c)), so a Newton step from the infeasible end never
  overshoots the root; it replaces the midpoint whenever it lands inside the bracket, which
  cuts the ~40 bisection steps to a handful without giving up the bracket's guarantee.

  Args:
    bits: [K] upload bits (0: the client only computes).
    snr_coeff: [K] a_k in Hz.
    compute_s: [K] compute times.
    total_bw_hz: B_tot.
    b_min_hz: smallest band per client.
    rtol: relative width of the final tau bracket.
    max_iter: search steps at most.

  Returns:
    (tau_s, bandwidth_hz [K]): realized latency of the returned split and the split.

  Raises:
    SolverFailure: infeasible (K b_min > B_tot, a sending client with no gain) or bad inputs.

  References: ALGORITHM.md section 6.
  """
  bits, a, c = np.broadcast_arrays(np.asarray(bits, np.float64),
                                   np.asarray(snr_coeff, np.float64),
                                   np.asarray(compute_s, np.float64))
  k = bits.shape[0]
  if not (np.all(np.isfinite(bits)) and np.all(np.isfinite(a)) and np.all(np.isfinite(c))):
    raise SolverFailure("non-finite inputs")
  if k * b_min_hz > total_bw_hz * (1 + 1e-12):
    raise SolverFailure(f"{k} clients x b_min {b_min_hz} Hz exceed the band {total_bw_hz} Hz")
  sending = bits > 0
  if np.any(sending & ~(a > 0)):
    raise SolverFailure("a client with bits to send has zero channel gain")
  b_max = total_bw_hz - (k - 1) * b_min_hz
  equal = np.full(k, total_bw_hz / k)
  if not np.any(sending):
    return float(np.max(c)), equal

  def need(tau):
    """Bands needed at latency tau, and their total's derivative in tau."""
    with np.errstate(divide="ignore"):
      rate = np.where(sending, bits / np.maximum(tau - c, 0.0), 0.0)
    b = bandwidth_for_rate(rate, a, b_min_hz, b_max)
    # d b_k / d tau = -(bits_k / (tau - c_k)^2) / R_k'(b_k), zero where b_min binds.
    with np.errstate(divide="ignore", invalid="ignore"):
      slope = np.where(sending & (b > b_min_hz), -rate ** 2 / bits / _rate_slope(b, a), 0.0)
    return b, float(np.sum(slope))

  lo = max(float(np.max(c)),
           float(np.max(wireless.client_latencies_s(bits, b_max, a, c)[sending])))
  hi = wireless.round_latency_s(bits, equal, a, c)
  bands, slope = need(lo)
  excess = bands.sum() - total_bw_hz
  if excess <= 0:
    hi = lo
  for _ in range(max_iter):
    if hi - lo <= rtol * hi:
      break
    step = -excess / slope if (np.isfinite(excess) and slope < 0) else np.inf
    if step <= 0.25 * rtol * lo:
      trial = lo * (1.0 + 0.5 * rtol)  # Newton has converged on lo: close the bracket above it
    else:
      trial = lo + step
    if not lo < trial < hi:
      trial = 0.5 * (lo + hi)
    trial_bands, trial_slope = need(trial)
    trial_excess = trial_bands.sum() - total_bw_hz
    if trial_excess <= 0:
      hi = trial
    else:
      lo, excess, slope = trial, trial_excess, trial_slope
  bandwidth, _ = need(hi)
  if not np.all(np.isfinite(bandwidth)):  # hi is feasible by construction; guard anyway
    bandwidth = equal
  tau = wireless.round_latency_s(bits, bandwidth, a, c)
  if not np.isfinite(tau):
    raise SolverFailure("no finite latency")
  return tau, bandwidth


def equal_split_latency(bits, snr_coeff, compute_s, total_bw_hz: float
                        ) -> tuple[float, np.ndarray]:
  """Latency of the equal split B_tot / K (the last fallback and the 'no solver' ablation).

  References: ALGORITHM.md sections 6 and 7.
  """
  k = np.shape(snr_coeff)[0]
  bandwidth = np.full(k, total_bw_hz / k)
  return wireless.round_latency_s(bits, bandwidth, snr_coeff, compute_s), bandwidth


def solve_p3(m_candidates: Sequence[int], phi_fn: Callable[[int], float], V: float, Q: float,
             tbar_s: float, bits_fn: Callable[[int], object], snr_coeff, compute_s,
             solver: Callable) -> tuple[int, np.ndarray, float, float]:
  """Per-round drift-plus-penalty problem P3 by enumeration over m.

  `min_m V * Phi(m) + Q * tau(m) / Tbar`, tau(m) the minimum latency of payload bits_fn(m).
  Enumeration is exact. When Q = 0 the latency drops out of the objective, so only the m with
  the smallest Phi is solved for (the smallest such m: equal error, less latency).

  Args:
    m_candidates: kept-component counts to try (1..r).
    phi_fn: m -> predicted sparsification error Phi(m).
    V: Lyapunov weight of the error.
    Q: current virtual queue.
    tbar_s: budget Tbar.
    bits_fn: m -> bits per client (scalar or [K]).
    snr_coeff: [K] a_k in Hz.
    compute_s: [K] compute times.
    solver: (bits [K], a [K], c [K]) -> (tau_s, bandwidth_hz [K]); e.g. a MinLatencyProblem or
      functools.partial(min_latency_numpy, total_bw_hz=..., b_min_hz=...).

  Returns:
    (m, bandwidth_hz [K], tau_s, objective).

  Raises:
    Whatever the solver raises, and SolverFailure on a non-finite latency.

  References: ALGORITHM.md section 6.
  """
  shape = np.shape(snr_coeff)
  candidates = sorted(int(m) for m in m_candidates)
  if not candidates:
    raise ValueError("no candidate m")
  phis = {m: float(phi_fn(m)) for m in candidates}
  if Q == 0:
    best_phi = min(phis.values())
    candidates = [min(m for m in candidates if phis[m] == best_phi)]
  best = None
  for m in candidates:
    bits = np.broadcast_to(np.asarray(bits_fn(m), np.float64), shape)
    tau, bandwidth = solver(bits, snr_coeff, compute_s)
    if not np.isfinite(tau):
      raise SolverFailure(f"non-finite latency at m = {m}")
    objective = V * phis[m] + Q * tau / tbar_s
    if best is None or objective < best[3]:  # strict: ties keep the smaller m
      best = (m, np.asarray(bandwidth), float(tau), float(objective))
  return best


@dataclasses.dataclass(frozen=True)
class P3Decision:
  """What the controller decided for one round.

  Attributes:
    m: components kept per layer.
    bandwidth_hz: [K] FDMA split.
    tau_s: predicted round latency of (m, bandwidth_hz).
    objective: V * Phi(m) + Q * tau / Tbar.
    solver: "cvx", "numpy" or "equal" (the one whose answer this is).
    fallbacks: how many solvers failed before it (0, 1 or 2).
    errors: the failure messages, in order.
  """

  m: int
  bandwidth_hz: np.ndarray
  tau_s: float
  objective: float
  solver: str
  fallbacks: int
  errors: tuple[str, ...] = ()


def solve_with_fallback(m_candidates: Sequence[int], phi_fn: Callable[[int], float], V: float,
                        Q: float, tbar_s: float, bits_fn: Callable[[int], object], snr_coeff,
                        compute_s, *, total_bw_hz: float, b_min_hz: float = DEFAULT_B_MIN_HZ,
                        cvx_problem: MinLatencyProblem | None = None,
                        primary: str = "cvx") -> P3Decision:
  """P3 with the fallback chain CVX -> NumPy twin -> equal split with m = 1; no solver failure
  raises.

  A solver fails when it raises, reports a status other than optimal, returns a non-finite
  latency, or returns an allocation the round cannot use (`_check_allocation`); each failure is
  logged and the next stage runs. The last stage gives every client B_tot / K and the smallest
  candidate m (1 for the usual 1..r) and cannot fail (its latency may be inf if a client has no
  gain at all; the run goes on and the queue records it).

  Args:
    m_candidates, phi_fn, V, Q, tbar_s, bits_fn, snr_coeff, compute_s: as in `solve_p3`.
    total_bw_hz: B_tot.
    b_min_hz: smallest band per client.
    cvx_problem: the compiled problem (needed when primary = "cvx").
    primary: "cvx" (default) or "numpy" (start at the twin).

  Returns:
    A P3Decision whose allocation is valid: m one of m_candidates, K finite positive bands
    summing to at most B_tot (a stage's answer that is not counts as a failure).

  Raises:
    ValueError: total_bw_hz is not a finite number > 0 (no split of no band exists).

  References: ALGORITHM.md section 6.
  """
  if not (np.isfinite(total_bw_hz) and total_bw_hz > 0):
    raise ValueError("total_bw_hz must be a finite number > 0 Hz (config "
                     f"wireless.bandwidth_mhz), got {total_bw_hz}")
  m_candidates = list(m_candidates)
  errors = []
  stages = []
  if primary == "cvx":
    stages.append(("cvx", None if cvx_problem is None else cvx_problem.solve))
  elif primary != "numpy":
    errors.append(f"unknown primary solver {primary!r}; using the NumPy twin")
  stages.append(("numpy", lambda bits, a, c: min_latency_numpy(bits, a, c, total_bw_hz, b_min_hz)))
  for name, solver in stages:
    try:
      if solver is None:
        raise SolverFailure("no compiled CVXPY problem was given")
      m, bandwidth, tau, objective = solve_p3(m_candidates, phi_fn, V, Q, tbar_s, bits_fn,
                                              snr_coeff, compute_s, solver)
      if not np.isfinite(objective):
        raise SolverFailure("non-finite objective")
      _check_allocation(m, bandwidth, m_candidates, np.size(snr_coeff), total_bw_hz)
      return P3Decision(m, bandwidth, tau, objective, name, len(errors), tuple(errors))
    except Exception as e:  # any failure of a stage, whatever its type, moves to the next
      message = f"{name}: {type(e).__name__}: {e}"
      logging.warning("TSFA solver failed, falling back: %s", message)
      errors.append(message)
  return _equal_fallback(m_candidates, phi_fn, V, Q, tbar_s, bits_fn, snr_coeff, compute_s,
                         total_bw_hz, errors)


def _check_allocation(m, bandwidth, m_candidates, k: int, total_bw_hz: float) -> None:
  """Raises SolverFailure unless (m, bandwidth) is an allocation the round can use."""
  bandwidth = np.asarray(bandwidth)
  if m not in m_candidates:
    raise SolverFailure(f"m = {m} is not one of the candidates {list(m_candidates)}")
  if bandwidth.shape != (k,) or not np.all(np.isfinite(bandwidth)):
    raise SolverFailure(f"bandwidth must be {k} finite values, got {bandwidth}")
  if not np.all(bandwidth > 0):
    raise SolverFailure(f"bandwidth has a non-positive share: {bandwidth}")
  if bandwidth.sum() > total_bw_hz * (1 + 1e-9):
    raise SolverFailure(f"bandwidth sums to {bandwidth.sum():.6g} Hz > B_tot {total_bw_hz:.6g} Hz")


def _equal_fallback(m_candidates, phi_fn, V, Q, tbar_s, bits_fn, snr_coeff, compute_s,
                    total_bw_hz, errors) -> P3Decision:
  """Last resort: equal split, smallest m; every step guarded so that it cannot raise."""
  try:
    m = min(int(m) for m in m_candidates)
  except Exception:  # a malformed candidate list must not end the run either
    m = 1
  k = int(np.size(snr_coeff)) or 1
  bandwidth = np.full(k, total_bw_hz / k)
  try:
    bits = np.broadcast_to(np.asarray(bits_fn(m), np.float64), (k,))
    tau, bandwidth = equal_split_latency(bits, snr_coeff, compute_s, total_bw_hz)
  except Exception as e:  # e.g. bits_fn itself failing: report the round as unbounded
    errors.append(f"equal: {type(e).__name__}: {e}")
    tau = math.inf
  try:
    objective = float(V * phi_fn(m) + (Q * tau / tbar_s if Q else 0.0))  # no 0 * inf = nan
  except Exception:  # the objective is only reported; inf marks it unknown
    objective = math.inf
  logging.warning("TSFA used the equal-bandwidth fallback with m = %d (tau %.4g s)", m, tau)
  return P3Decision(m, bandwidth, tau, objective, "equal", len(errors), tuple(errors))
