"""Minimum-latency bandwidth allocation for a given payload: CVXPY (DPP) and its NumPy twin.

For a fixed number of kept components every client's payload is known, and the FDMA split that
minimizes the round latency `max_k c_k + bits_k / R_k(b_k)` subject to `sum_k b_k <= B_tot` is a
convex program. `MinLatencyProblem` compiles it once with parameters (DPP) and re-solves it each
round; `min_latency_numpy` solves the same problem exactly by bisection on tau; the equal split
is the last fallback and the fixed controller's allocation.

References: ALGORITHM.md section 6 (solving).
"""

from __future__ import annotations

import functools
import math
from typing import Mapping
import warnings

import cvxpy as cp
import numpy as np
from scipy import special

from softjax.config.choices import SOLVERS  # noqa: F401  (re-exported)
from softjax.wireless import link as link_lib

# [choice] Smallest band a sampled client is given, in Hz. It keeps every client (even one with
# nothing to send) on the air and keeps the solver away from the b -> 0 edge of the rate's domain;
# 1 kHz is far below any share the optimum gives (20 MHz over 100 clients is 200 kHz each).
DEFAULT_B_MIN_HZ = 1e3




_LN2 = math.log(2.0)


_MEGA = 1e6


class SolverFailure(RuntimeError):
  """A latency solver returned no usable answer (bad status, infeasible, non-finite)."""


def _check_band(k: int, b_min_hz: float, total_bw_hz: float, error: type[Exception]) -> None:
  """Raises `error` unless K bands of at least b_min fit in B_tot (the problem's feasibility)."""
  if not k * b_min_hz <= total_bw_hz * (1 + 1e-12):
    raise error(f"{k} clients x b_min {b_min_hz} Hz exceed the band {total_bw_hz} Hz")


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
    _check_band(num_clients, b_min_hz, total_bw_hz, ValueError)
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
    tau = link_lib.round_latency_s(bits, bandwidth, snr_coeff, compute_s)
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
  b[link_lib.rate_bps(b_max_hz, a) < rate] = np.inf
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
  bits, a, c = _checked_inputs(bits, snr_coeff, compute_s, total_bw_hz, b_min_hz)
  k = bits.shape[0]
  sending = bits > 0
  b_max = total_bw_hz - (k - 1) * b_min_hz
  equal = np.full(k, total_bw_hz / k)
  if not np.any(sending):
    return float(np.max(c)), equal
  need = functools.partial(_bands_needed, bits=bits, a=a, c=c, b_min_hz=b_min_hz,
                           b_max_hz=b_max)
  lo = max(float(np.max(c)),
           float(np.max(link_lib.client_latencies_s(bits, b_max, a, c)[sending])))
  hi = link_lib.round_latency_s(bits, equal, a, c)
  hi = _smallest_feasible_tau(need, lo, hi, total_bw_hz, rtol, max_iter)
  bandwidth, _ = need(hi)
  if not np.all(np.isfinite(bandwidth)):  # hi is feasible by construction; guard anyway
    bandwidth = equal
  tau = link_lib.round_latency_s(bits, bandwidth, a, c)
  if not np.isfinite(tau):
    raise SolverFailure("no finite latency")
  return tau, bandwidth


def _checked_inputs(bits, snr_coeff, compute_s, total_bw_hz: float, b_min_hz: float):
  """(bits, a, c) as float64 arrays of one shape; SolverFailure where no split can exist."""
  bits, a, c = np.broadcast_arrays(np.asarray(bits, np.float64),
                                   np.asarray(snr_coeff, np.float64),
                                   np.asarray(compute_s, np.float64))
  k = bits.shape[0]
  if not (np.all(np.isfinite(bits)) and np.all(np.isfinite(a)) and np.all(np.isfinite(c))):
    raise SolverFailure("non-finite inputs")
  _check_band(k, b_min_hz, total_bw_hz, SolverFailure)
  if np.any((bits > 0) & ~(a > 0)):
    raise SolverFailure("a client with bits to send has zero channel gain")
  return bits, a, c


def _bands_needed(tau, *, bits, a, c, b_min_hz: float, b_max_hz: float):
  """Bands needed at latency tau, and their total's derivative in tau."""
  sending = bits > 0
  with np.errstate(divide="ignore"):
    rate = np.where(sending, bits / np.maximum(tau - c, 0.0), 0.0)
  b = bandwidth_for_rate(rate, a, b_min_hz, b_max_hz)
  # d b_k / d tau = -(bits_k / (tau - c_k)^2) / R_k'(b_k), zero where b_min binds.
  with np.errstate(divide="ignore", invalid="ignore"):
    slope = np.where(sending & (b > b_min_hz), -rate ** 2 / bits / _rate_slope(b, a), 0.0)
  return b, float(np.sum(slope))


def _smallest_feasible_tau(need, lo: float, hi: float, total_bw_hz: float, rtol: float,
                           max_iter: int) -> float:
  """The bracket [lo, hi] (lo infeasible unless feasible itself, hi feasible) closed on the root
  of sum(need(tau)) = B_tot by Newton steps from lo, bisection where they leave the bracket."""
  bands, slope = need(lo)
  excess = bands.sum() - total_bw_hz
  if excess <= 0:
    return lo
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
  return hi


def equal_split_latency(bits, snr_coeff, compute_s, total_bw_hz: float
                        ) -> tuple[float, np.ndarray]:
  """Latency of the equal split B_tot / K (the last fallback and the 'no solver' ablation).

  References: ALGORITHM.md sections 6 and 7.
  """
  k = np.shape(snr_coeff)[0]
  bandwidth = np.full(k, total_bw_hz / k)
  return link_lib.round_latency_s(bits, bandwidth, snr_coeff, compute_s), bandwidth
