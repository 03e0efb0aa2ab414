"""Between two jitted rounds, on the host: round t's channel, the decision (O_t, b_t), the queue.

  fixed: O_t = method.keep_ratio and the equal split B_tot / K (SOFT without the online stage;
         also how dense and the E1 baselines run). The queue is still tracked, for reporting.
  osfa:  the online stage only: P3 every round at the config's rank (ALGORITHM.md 6, 7).
  tsfa:  the offline stage picks the rank and O_0 before round 0 (ALGORITHM.md 5; the caller
         builds the model at that rank), round 0 sends O_0 on the min-latency split [choice],
         then P3 every round.

Everything is a pure function of (config, seed, round) plus the queue, which the checkpoint
carries, so a resumed run makes the same decisions as an uninterrupted one.

References: ALGORITHM.md sections 4-7.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Sequence

import ml_collections
import numpy as np

from softjax import tsfa
from softjax import wireless

MODES = ("fixed", "osfa", "tsfa")  # values of config.controller.name


@dataclasses.dataclass(frozen=True)
class Link:
  """The run's fixed radio and device facts: one entry per client (index by client id)."""
  channel: wireless.ChannelConfig
  beta: np.ndarray  # [N] large-scale gains
  speeds: np.ndarray  # [N] device FLOP/s
  attenuation: np.ndarray | None = None  # [T, N] extra power gain per round (bursty fading)
  csi_error: float = 0.0  # the controller sees g (1 + eps), eps ~ N(0, csi_error^2)
  dropout: float = 0.0  # probability that a sampled client's upload is lost

  def gains(self, seed: int, t: int) -> np.ndarray:
    """[N] true small-scale power gains of round t: Rayleigh, times the burst attenuation."""
    g = wireless.fading(len(self.beta), seed, t)
    if self.attenuation is not None:
      g = g * self.attenuation[min(t, len(self.attenuation) - 1)]
    return g

  def compute_s(self, fl: ml_collections.ConfigDict, flops_per_example: float) -> np.ndarray:
    """[N] local training times c_k of one round (E steps of b examples)."""
    return wireless.compute_time_s(fl.local_steps, fl.batch_size, flops_per_example,
                                   self.speeds)


def channel_config(w: ml_collections.ConfigDict) -> wireless.ChannelConfig:
  """The `wireless` config section as a ChannelConfig (MHz and GFLOP/s to SI units)."""
  return wireless.ChannelConfig(
      radius_m=w.radius_m, min_distance_m=w.min_distance_m, tx_power_dbm=w.tx_power_dbm,
      noise_psd_dbm_hz=w.noise_psd_dbm_hz, bandwidth_hz=w.bandwidth_mhz * 1e6,
      shadowing_db=w.shadowing_db,
      device_flops_range=(w.device_gflops_min * 1e9, w.device_gflops_max * 1e9))


def make_link(config: ml_collections.ConfigDict) -> Link:
  """Places the N clients, draws their shadowing and device speeds (once per run)."""
  w = config.wireless
  cfg = channel_config(w)
  n = config.fl.num_clients
  beta = wireless.large_scale_gain(wireless.place_clients(n, cfg, config.seed), cfg, config.seed)
  attenuation = None
  if w.fading == "bursty":
    bad = wireless.burst_states(n, config.fl.rounds, config.seed, w.burst_p_bad, w.burst_p_good)
    attenuation = np.where(bad, 10.0 ** (-w.burst_depth_db / 10.0), 1.0)
  return Link(cfg, beta, wireless.device_speeds(n, cfg, config.seed), attenuation,
              float(w.csi_error), float(w.dropout))


def latency_budget_s(w: ml_collections.ConfigDict, link: Link, dense_bits: float, compute_s,
                     clients_per_round: int) -> float:
  """Tbar: `wireless.budget_s`, or `budget_fraction` x the dense reference latency.

  Args:
    w: the `wireless` config section.
    link: the run's Link.
    dense_bits: bits of a dense upload at the reference rank.
    compute_s: [N] compute times at the reference rank.
    clients_per_round: K.

  References: ALGORITHM.md section 4 (long-term constraint).
  """
  if w.budget_s > 0:
    return float(w.budget_s)
  return w.budget_fraction * wireless.dense_budget_s(
      dense_bits, link.beta, compute_s, link.channel, clients_per_round, w.budget_reference)


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
  """Decides (O_t, b_t) before each round and updates the virtual queue after it.

  The queue and the failure counter are the controller's only state (`state_dict`); everything
  else is recomputed from the config.
  """

  def __init__(self, mode: str, link: Link, compute_s: np.ndarray, *, seed: int, tbar_s: float,
               rank: int,
               bits_at: Callable[[float], int], V: float = 1.0, solver: str = "cvx",
               fixed_keep_ratio: float = 1.0, first_keep_ratio: float | None = None,
               clients_per_round: int | None = None):
    """
    Args:
      mode: fixed | osfa | tsfa.
      link: the run's Link.
      compute_s: [N] compute time of each client at this run's rank.
      seed: the run seed (fading is drawn from [seed, stream, round]).
      tbar_s: the budget Tbar.
      rank: r.
      bits_at: O -> bits one client uploads at keep ratio O (the method's own accounting,
        `sparsifiers.predicted_upload_bits`); P3 prices m components at O = m / r.
      V: Lyapunov weight.
      solver: cvx | numpy, where the fallback chain starts.
      fixed_keep_ratio: O for mode = fixed.
      first_keep_ratio: tsfa: O_0 from the offline stage, used in round 0.
      clients_per_round: K (needed to build the CVXPY problem).
    """
    if mode not in MODES:
      raise ValueError(f"unknown controller {mode!r}")
    self.mode, self.link, self.seed = mode, link, seed
    self.compute_s = np.asarray(compute_s, np.float64)
    self.tbar_s, self.rank, self.V, self.solver = float(tbar_s), int(rank), float(V), solver
    self.fixed_keep_ratio = float(fixed_keep_ratio)
    self.first_keep_ratio = first_keep_ratio
    self._bits_at = functools.lru_cache(maxsize=None)(lambda o: float(bits_at(o)))
    self._bits = lambda m: self._bits_at(int(m) / self.rank)
    self.queue = 0.0
    self.fallbacks = 0
    self._cvx = None
    if mode != "fixed" and solver == "cvx":
      if clients_per_round is None:
        raise ValueError("clients_per_round is needed to build the CVXPY problem")
      self._cvx = tsfa.MinLatencyProblem(clients_per_round, link.channel.bandwidth_hz)

  def state_dict(self) -> dict[str, Any]:
    return {"queue": self.queue, "fallbacks": self.fallbacks}

  def load_state_dict(self, state: dict[str, Any]) -> None:
    self.queue = float(state["queue"])
    self.fallbacks = int(state["fallbacks"])

  def plan(self, t: int, clients: np.ndarray, scores_per_layer: Sequence[np.ndarray] | None
           ) -> RoundPlan:
    """The decision for round t over the sampled `clients`.

    Args:
      t: round index (0-based).
      clients: [K] sampled client ids.
      scores_per_layer: the global factors' component scores (Phi's input); None before any.
    """
    clients = np.asarray(clients)
    g = self.link.gains(self.seed, t)
    seen = wireless.csi_estimate(g, self.link.csi_error, self.seed, t)
    beta = self.link.beta[clients]
    a_true = wireless.snr_coefficient_hz(beta, g[clients], self.link.channel)
    a = wireless.snr_coefficient_hz(beta, seen[clients], self.link.channel)  # what P3 sees
    received = ~wireless.dropouts(len(self.link.beta), self.link.dropout, self.seed, t)[clients]
    compute = self.compute_s[clients]
    total_bw = self.link.channel.bandwidth_hz
    tick = time.perf_counter()
    if self.mode == "fixed":
      keep = self.fixed_keep_ratio
      bits = np.full(len(clients), self._bits_at(keep))
      tau, bandwidth = tsfa.equal_split_latency(bits, a, compute, total_bw)
      decision = tsfa.P3Decision(_kept(keep, self.rank), bandwidth, tau, 0.0, "equal", 0)
    elif self.mode == "tsfa" and t == 0:  # O_0 is given; only the split is optimized
      # O_0 = mbar / r may be 0 (nothing fits the budget); a client still sends m = 1.
      keep = _kept(float(self.first_keep_ratio), self.rank) / self.rank
      decision = tsfa.solve_with_fallback([_kept(keep, self.rank)], lambda _: 0.0, 0.0, 0.0,
                                          self.tbar_s, self._bits, a, compute,
                                          total_bw_hz=total_bw, cvx_problem=self._cvx,
                                          primary=self.solver)
    else:
      layers = scores_per_layer if scores_per_layer is not None else [np.zeros(self.rank)]
      phi = functools.partial(tsfa.phi_from_scores, layers)
      decision = tsfa.solve_with_fallback(range(1, self.rank + 1), phi, self.V, self.queue,
                                          self.tbar_s, self._bits, a, compute,
                                          total_bw_hz=total_bw, cvx_problem=self._cvx,
                                          primary=self.solver)
      keep = decision.m / self.rank
    elapsed = time.perf_counter() - tick
    self.fallbacks += decision.fallbacks
    return RoundPlan(keep_ratio=keep, m=decision.m, bandwidth_hz=decision.bandwidth_hz,
                     snr_coeff=a_true, compute_s=compute,
                     received=received.astype(np.float64), predicted_latency_s=decision.tau_s,
                     solver=decision.solver, solver_time_s=elapsed,
                     fallbacks=decision.fallbacks)

  def observe(self, latency_s: float) -> float:
    """Feeds the realized round latency tau_t to the queue; returns Q_{t+1}."""
    self.queue = tsfa.queue_update(self.queue, latency_s, self.tbar_s)
    return self.queue


def _kept(keep_ratio: float, rank: int) -> int:
  """m = max(1, ceil(O r)) on the host (ALGORITHM.md 2.3), for reporting and pricing."""
  return max(1, min(rank, int(np.ceil(keep_ratio * rank - 1e-9))))
