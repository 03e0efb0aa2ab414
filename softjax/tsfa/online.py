"""TSFA stage 2, every round on the host: the virtual queue and the drift-plus-penalty problem P3.

A virtual queue tracks how far realized latencies have run over the budget Tbar; each round the
server picks the number of kept components m and the FDMA split by minimizing
`V * Phi(m) + Q * tau(m) / Tbar` (enumeration over m, a convex min-latency split per m), with a
fallback chain that keeps a run alive when a solver fails.

References: ALGORITHM.md section 6.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

from absl import logging
import numpy as np

from softjax.tsfa.solvers import (
  DEFAULT_B_MIN_HZ,
  MinLatencyProblem,
  SolverFailure,
  equal_split_latency,
  min_latency_numpy,
)


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


@dataclasses.dataclass(frozen=True)
class P3Problem:
  """One round's instance of P3 (ALGORITHM.md section 6): everything but the solver.

  Attributes:
    m_candidates: kept-component counts to try (1..r).
    phi_fn: m -> predicted sparsification error Phi(m).
    V: Lyapunov weight of the error.
    Q: current virtual queue.
    tbar_s: budget Tbar.
    bits_fn: m -> bits per client (scalar or [K]).
    snr_coeff: [K] a_k in Hz.
    compute_s: [K] compute times.
  """

  m_candidates: Sequence[int]
  phi_fn: Callable[[int], float]
  V: float
  Q: float
  tbar_s: float
  bits_fn: Callable[[int], object]
  snr_coeff: np.ndarray
  compute_s: np.ndarray

  def objective(self, phi: float, tau_s: float) -> float:
    """V * Phi(m) + Q * tau / Tbar, with an empty queue contributing 0 even at tau = inf."""
    return self.V * phi + (self.Q * tau_s / self.tbar_s if self.Q else 0.0)


def solve_p3(problem: P3Problem, solver: Callable) -> tuple[int, np.ndarray, float, float]:
  """Per-round drift-plus-penalty problem P3 by enumeration over m.

  `min_m V * Phi(m) + Q * tau(m) / Tbar`, tau(m) the minimum latency of payload bits_fn(m).
  Enumeration is exact. When Q = 0 the latency drops out of the objective, so only the m with
  the smallest Phi is solved for (the smallest such m: equal error, less latency).

  Args:
    problem: the round's P3 instance.
    solver: (bits [K], a [K], c [K]) -> (tau_s, bandwidth_hz [K]); e.g. a MinLatencyProblem or
      functools.partial(min_latency_numpy, total_bw_hz=..., b_min_hz=...).

  Returns:
    (m, bandwidth_hz [K], tau_s, objective).

  Raises:
    Whatever the solver raises, and SolverFailure on a non-finite latency.

  References: ALGORITHM.md section 6.
  """
  shape = np.shape(problem.snr_coeff)
  candidates = sorted(int(m) for m in problem.m_candidates)
  if not candidates:
    raise ValueError("no candidate m")
  phis = {m: float(problem.phi_fn(m)) for m in candidates}
  if problem.Q == 0:
    best_phi = min(phis.values())
    candidates = [min(m for m in candidates if phis[m] == best_phi)]
  best = None
  for m in candidates:
    bits = np.broadcast_to(np.asarray(problem.bits_fn(m), np.float64), shape)
    tau, bandwidth = solver(bits, problem.snr_coeff, problem.compute_s)
    if not np.isfinite(tau):
      raise SolverFailure(f"non-finite latency at m = {m}")
    objective = problem.objective(phis[m], tau)
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


def solve_with_fallback(problem: P3Problem, *, total_bw_hz: float,
                        b_min_hz: float = DEFAULT_B_MIN_HZ,
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
    problem: the round's P3 instance.
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
      m, bandwidth, tau, objective = solve_p3(problem, solver)
      if not np.isfinite(objective):
        raise SolverFailure("non-finite objective")
      _check_allocation(m, bandwidth, list(problem.m_candidates), np.size(problem.snr_coeff),
                        total_bw_hz)
      return P3Decision(m=m, bandwidth_hz=bandwidth, tau_s=tau, objective=objective,
                        solver=name, fallbacks=len(errors), errors=tuple(errors))
    except Exception as e:  # any failure of a stage, whatever its type, moves to the next
      message = f"{name}: {type(e).__name__}: {e}"
      logging.warning("TSFA solver failed, falling back: %s", message)
      errors.append(message)
  return _equal_fallback(problem, total_bw_hz, errors)


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


def _equal_fallback(problem: P3Problem, total_bw_hz: float, errors: list[str]) -> P3Decision:
  """Last resort: equal split, smallest m; every step guarded so that it cannot raise."""
  try:
    m = min(int(m) for m in problem.m_candidates)
  except Exception:  # a malformed candidate list must not end the run either
    m = 1
  k = int(np.size(problem.snr_coeff)) or 1
  bandwidth = np.full(k, total_bw_hz / k)
  try:
    bits = np.broadcast_to(np.asarray(problem.bits_fn(m), np.float64), (k,))
    tau, bandwidth = equal_split_latency(bits, problem.snr_coeff, problem.compute_s, total_bw_hz)
  except Exception as e:  # e.g. bits_fn itself failing: report the round as unbounded
    errors.append(f"equal: {type(e).__name__}: {e}")
    tau = math.inf
  try:
    objective = float(problem.objective(problem.phi_fn(m), tau))
  except Exception:  # the objective is only reported; inf marks it unknown
    objective = math.inf
  logging.warning("TSFA used the equal-bandwidth fallback with m = %d (tau %.4g s)", m, tau)
  return P3Decision(m=m, bandwidth_hz=bandwidth, tau_s=tau, objective=objective,
                    solver="equal", fallbacks=len(errors), errors=tuple(errors))
