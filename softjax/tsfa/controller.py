"""Between two jitted rounds, on the host: round t's channel, the decision (O_t, b_t), the queue.

  fixed: O_t = method.keep_ratio and the equal split B_tot / K (SOFT without the online stage;
         also how dense and the E1 baselines run). The queue is still tracked, for reporting.
  osfa:  the online stage only: P3 every round at the config's rank (ALGORITHM.md 6, 7).
  tsfa:  the offline stage picks the rank and O_0 before round 0 (ALGORITHM.md 5; the caller
         builds the model at that rank), round 0 sends O_0 on the min-latency split [choice],
         then P3 every round.
A dense upload (any aggregation rule) sends everything, so with it O_t = 1 and osfa / tsfa
choose only the min-latency split of its payload; tsfa's offline stage still picks the rank
(`offline.plan_offline(..., whole_upload=...)`).

A `LatencyController` holds only what is fixed for a run (the link, Tbar, the rank, the method's
payload prices, the compiled CVXPY problem). What changes between rounds is a
`ControllerState` (the virtual queue and the solver-failure count): `plan` and `observe` take
one and return the next, so the state lives in the run-state pytree, is stacked per sweep
member and is saved by orbax with the rest; a resumed run makes the same decisions as an
uninterrupted one.

References: ALGORITHM.md sections 4-7.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, NamedTuple, Sequence

import numpy as np

from softjax.config.choices import CONTROLLER_MODES as MODES  # noqa: F401  (re-exported)
from softjax.tsfa import online, solvers
from softjax.wireless import channel as channel_lib
from softjax.wireless.link import Link


class ControllerState(NamedTuple):
  """What the controller carries from one round to the next (host values, float64 / int64).

  Leading axis `[S]` when stacked over sweep members; `[]` for one run.
  """
  queue: np.ndarray  # float64, the virtual queue Q_t (ALGORITHM.md 6), normalized by Tbar
  fallbacks: np.ndarray  # int64, solver failures so far (each fell back to the next solver)


def init_state() -> ControllerState:
  """Q_0 = 0 and no failures."""
  return ControllerState(queue=np.zeros((), np.float64), fallbacks=np.zeros((), np.int64))


@dataclasses.dataclass(frozen=True)
class ControllerSpec:
  """The settings of a run's controller.

  Attributes:
    mode: fixed | osfa | tsfa.
    seed: the run seed (fading is drawn from [seed, stream, round]).
    tbar_s: the budget Tbar.
    rank: r.
    V: Lyapunov weight of Phi in P3.
    solver: cvx | numpy, where the fallback chain starts.
    fixed_keep_ratio: O for mode = fixed.
    first_keep_ratio: tsfa: O_0 from the offline stage, used in round 0.
    clients_per_round: K (needed to build the CVXPY problem).
  """
  mode: str
  seed: int
  tbar_s: float
  rank: int
  V: float = 1.0
  solver: str = "cvx"
  fixed_keep_ratio: float = 1.0
  first_keep_ratio: float | None = None
  clients_per_round: int | None = None


@dataclasses.dataclass(frozen=True)
class RoundPlan:
  """The controller's decision for one round; the uplink arrays go into the jitted round."""
  keep_ratio: float
  m: int
  bandwidth_hz: np.ndarray  # [K]
  snr_coeff: np.ndarray  # [K] true SNR coefficients (the round's realized latency uses them)
  compute_s: np.ndarray  # [K]
  received: np.ndarray  # [K] 1.0 = upload arrives, 0.0 = lost mid-round (dropout)
  predicted_latency_s: float  # with the gains the controller saw (imperfect under CSI error)
  solver: str  # cvx | numpy | equal (the fallback, or the fixed controller's split)
  solver_time_s: float
  fallbacks: int

  @property
  def uplink(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(bandwidth_hz, snr_coeff, compute_s, received): federated.Uplink's fields."""
    return self.bandwidth_hz, self.snr_coeff, self.compute_s, self.received


class LatencyController:
  """Decides (O_t, b_t) before each round (`plan`) and updates the queue after it (`observe`).

  The object holds no round-to-round state: both methods are pure functions of the
  `ControllerState` they are given (the CVXPY problem it keeps is a compiled cache whose
  parameters every solve sets anew).
  """

  def __init__(self, spec: ControllerSpec, link: Link, compute_s: np.ndarray,
               bits_at: Callable[[float], int],
               payload_bits: Callable[[int, np.ndarray], np.ndarray] | None = None):
    """
    Args:
      spec: the controller's settings.
      link: the run's Link.
      compute_s: [N] compute time of each client at this run's rank.
      bits_at: O -> bits one client uploads at keep ratio O (the method's own accounting,
        `sparsify.payload.predicted_upload_bits`); P3 prices m components at O = m / r.
      payload_bits: for an upload that always sends everything (a dense upload under any
        aggregation rule, `federated.lora_rules.upload_bits`): (t, clients [K]) -> [K] bits.
        Then O = 1 every round and osfa / tsfa choose only the bandwidth split, the one that
        minimizes the round's latency (P3 with a single m = r: its error term is constant).
    """
    if spec.mode not in MODES:
      raise ValueError(f"unknown controller {spec.mode!r}")
    self.spec, self.link = spec, link
    self.mode, self.seed, self.solver = spec.mode, spec.seed, spec.solver
    self.compute_s = np.asarray(compute_s, np.float64)
    self.tbar_s, self.rank, self.V = float(spec.tbar_s), int(spec.rank), float(spec.V)
    self.fixed_keep_ratio = float(spec.fixed_keep_ratio)
    self.first_keep_ratio = spec.first_keep_ratio
    self._bits_at = functools.lru_cache(maxsize=None)(lambda o: float(bits_at(o)))
    self._bits = lambda m: self._bits_at(int(m) / self.rank)
    self._payload_bits = payload_bits
    self._cvx = None
    if spec.mode != "fixed" and spec.solver == "cvx":
      if spec.clients_per_round is None:
        raise ValueError("clients_per_round is needed to build the CVXPY problem")
      self._cvx = solvers.MinLatencyProblem(spec.clients_per_round, link.channel.bandwidth_hz)

  def plan(self, state: ControllerState, t: int, clients: np.ndarray,
           scores_per_layer: Sequence[np.ndarray] | None
           ) -> tuple[RoundPlan, ControllerState]:
    """The decision for round t over the sampled `clients`, and the state after it.

    Args:
      state: the controller state before round t (its queue Q_t weighs latency in P3).
      t: round index (0-based).
      clients: [K] sampled client ids.
      scores_per_layer: the global factors' component scores (Phi's input); None before any.

    Returns:
      (plan, state with this round's solver failures counted).
    """
    clients = np.asarray(clients)
    g = self.link.gains(self.seed, t)
    seen = channel_lib.csi_estimate(g, self.link.csi_error, self.seed, t)
    beta = self.link.beta[clients]
    a_true = channel_lib.snr_coefficient_hz(beta, g[clients], self.link.channel)
    a = channel_lib.snr_coefficient_hz(beta, seen[clients], self.link.channel)  # what P3 sees
    received = ~channel_lib.dropouts(len(self.link.beta), self.link.dropout, self.seed, t)[clients]
    compute = self.compute_s[clients]
    tick = time.perf_counter()
    whole = self._payload_bits is not None  # nothing to sparsify: O = 1
    if self.mode == "fixed":
      keep = 1.0 if whole else self.fixed_keep_ratio
      bits = (self._payload_bits(t, clients) if whole
              else np.full(len(clients), self._bits_at(keep)))
      tau, bandwidth = solvers.equal_split_latency(bits, a, compute,
                                                   self.link.channel.bandwidth_hz)
      decision = online.P3Decision(m=_kept(keep, self.rank), bandwidth_hz=bandwidth, tau_s=tau,
                                   objective=0.0, solver="equal", fallbacks=0)
    elif whole:  # only the split is optimized, for the round's own payloads
      keep, bits = 1.0, self._payload_bits(t, clients)
      problem = online.P3Problem([self.rank], lambda _: 0.0, 0.0, 0.0, self.tbar_s,
                                 lambda _: bits, a, compute)
      decision = self._solve(problem)
    elif self.mode == "tsfa" and t == 0:  # O_0 is given; only the split is optimized
      # O_0 = mbar / r may be 0 (nothing fits the budget); a client still sends m = 1.
      keep = _kept(float(self.first_keep_ratio), self.rank) / self.rank
      problem = online.P3Problem([_kept(keep, self.rank)], lambda _: 0.0, 0.0, 0.0, self.tbar_s,
                                 self._bits, a, compute)
      decision = self._solve(problem)
    else:
      layers = scores_per_layer if scores_per_layer is not None else [np.zeros(self.rank)]
      phi = functools.partial(online.phi_from_scores, layers)
      problem = online.P3Problem(range(1, self.rank + 1), phi, self.V, float(state.queue),
                                 self.tbar_s, self._bits, a, compute)
      decision = self._solve(problem)
      keep = decision.m / self.rank
    elapsed = time.perf_counter() - tick
    plan = RoundPlan(keep_ratio=keep, m=decision.m, bandwidth_hz=decision.bandwidth_hz,
                     snr_coeff=a_true, compute_s=compute,
                     received=received.astype(np.float64), predicted_latency_s=decision.tau_s,
                     solver=decision.solver, solver_time_s=elapsed,
                     fallbacks=decision.fallbacks)
    return plan, state._replace(fallbacks=state.fallbacks + decision.fallbacks)

  @property
  def reads_scores(self) -> bool:
    """Whether `plan` reads the global factors' scores (P3's error term): not for the fixed
    controller, nor for a whole upload, whose error term is constant."""
    return self.mode != "fixed" and self._payload_bits is None

  def _solve(self, problem: online.P3Problem) -> online.P3Decision:
    """P3 through the fallback chain, starting at the configured solver."""
    return online.solve_with_fallback(problem, total_bw_hz=self.link.channel.bandwidth_hz,
                                      cvx_problem=self._cvx, primary=self.solver)

  def observe(self, state: ControllerState, latency_s: float) -> ControllerState:
    """Feeds the realized round latency tau_t to the queue: the state with Q_{t+1}."""
    queue = online.queue_update(float(state.queue), latency_s, self.tbar_s)
    return state._replace(queue=np.asarray(queue, np.float64))


def _kept(keep_ratio: float, rank: int) -> int:
  """m = max(1, ceil(O r)) on the host (ALGORITHM.md 2.3), for reporting and pricing."""
  return max(1, min(rank, int(np.ceil(keep_ratio * rank - 1e-9))))
