"""The uplink: FDMA rates, compute time, per-client and round latency, the budget Tbar.

`rate_bps` and `client_latencies_s` take an array module (`xp`), so the same formula runs on the
host (NumPy, the controller) and inside the jitted round (jax.numpy, the realized latency).
`Link` holds a run's fixed radio and device facts, drawn once from the config.

References: ALGORITHM.md section 4.
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections
import numpy as np

from softjax.config.choices import BUDGET_REFERENCES as DENSE_BUDGET_REFERENCES  # noqa: F401  (re-exported)
from softjax.wireless import channel as channel_lib
from softjax.wireless.channel import ChannelConfig


def rate_bps(bandwidth_hz, snr_coeff, xp=np):
  """Shannon rate `R = b log2(1 + a / b)` of a band of b Hz; 0 where b = 0.

  Concave and increasing in b, tending to `a / ln 2` as b grows (the power-limited regime), which
  is why bandwidth alone cannot rescue a client in a deep fade. Written with log1p so that wide
  bands (a / b small) keep their precision.

  Args:
    bandwidth_hz: b >= 0.
    snr_coeff: a >= 0 in Hz (see `snr_coefficient_hz`).
    xp: the array namespace: numpy on the host (float64), jax.numpy inside the jitted round
      (float32), so both compute latency with this one formula.

  Returns:
    Rates in bit/s, broadcast shape.

  References: ALGORITHM.md section 4.
  """
  b, a = _floats(xp, bandwidth_hz), _floats(xp, snr_coeff)
  on = b > 0
  safe = xp.where(on, b, 1.0)  # keeps the untaken branch finite (and its gradient, under jit)
  return xp.where(on, safe * xp.log1p(a / safe) / math.log(2.0), 0.0)


def _floats(xp, x):
  """float64 NumPy on the host, float32 inside jit (the round's dtype)."""
  return np.asarray(x, np.float64) if xp is np else xp.asarray(x, xp.float32)


def compute_time_s(local_steps: int, batch_size: int, flops_per_example: float,
                   speed) -> np.ndarray:
  """Local training time `c_k = E * b * flops_per_example / f_k`.

  Args:
    local_steps: E.
    batch_size: b.
    flops_per_example: training FLOPs of one example (see `flops_per_example`).
    speed: f_k in FLOP/s, scalar or [N].

  Returns:
    Seconds, shape of `speed`.

  References: ALGORITHM.md section 4.
  """
  return local_steps * batch_size * flops_per_example / np.asarray(speed, np.float64)


def client_latencies_s(bits, bandwidth_hz, snr_coeff, compute_s, xp=np):
  """Per-client round time `c_k + bits_k / R_k(b_k)`; inf when bits > 0 meet a zero rate.

  Args:
    bits: [K] upload bits per client.
    bandwidth_hz: [K] allocated bandwidth.
    snr_coeff: [K] SNR coefficients a_k in Hz.
    compute_s: [K] local compute times.
    xp: numpy (host) or jax.numpy (inside the jitted round); see `rate_bps`.

  Returns:
    [K] seconds.

  References: ALGORITHM.md section 4.
  """
  bits = _floats(xp, bits)
  rates = rate_bps(bandwidth_hz, snr_coeff, xp)
  sending = bits > 0
  with np.errstate(divide="ignore"):  # rate 0 with bits to send -> inf, on purpose
    upload = xp.where(sending, bits / xp.where(sending, rates, 1.0), 0.0)
  return _floats(xp, compute_s) + upload


def round_latency_s(bits, bandwidth_hz, snr_coeff, compute_s) -> float:
  """Round latency `tau = max_k (c_k + bits_k / R_k(b_k))` over the sampled clients.

  The slowest client decides the round because the server waits for every upload (synchronous
  FedAvg). Infinite when a client with bits > 0 has zero bandwidth (or zero gain).

  Args:
    bits: [K] upload bits per client.
    bandwidth_hz: [K] allocated bandwidth.
    snr_coeff: [K] SNR coefficients a_k in Hz.
    compute_s: [K] local compute times.

  Returns:
    Seconds (float, possibly inf).

  References: ALGORITHM.md section 4.
  """
  return float(np.max(client_latencies_s(bits, bandwidth_hz, snr_coeff, compute_s)))


def dense_budget_s(dense_bits, beta, compute_s, cfg: ChannelConfig, clients_per_round: int,
                   reference: str = "expected_max") -> float:
  """Reference latency that a fractional budget Tbar is measured against.

  Every client uploads the dense payload over the mean channel (g = 1) on an equal share
  B_tot / K of the band, giving a per-client time `L_k = c_k + bits / R_k(B_tot / K)`.
  [choice] `reference="expected_max"` (default) returns the expected round latency
  `E[max_{k in S} L_k]` over a uniformly sampled K-subset S of the N clients, computed exactly
  from the order statistics (P(max = L_(j)) = C(j-1, K-1) / C(N, K) for the j-th smallest): it is
  what a dense round costs on average at mean fading, so Tbar = 0.5 x reference asks for about
  half the dense round time. `reference="worst"` returns `max_k L_k` over all N clients, a
  stricter reference dominated by the single farthest or slowest client.

  Args:
    dense_bits: bits of a dense upload (scalar or [N]).
    beta: [N] large-scale gains of all clients.
    compute_s: [N] compute times of all clients (scalar broadcasts).
    cfg: the channel config (bandwidth, power, noise).
    clients_per_round: K.
    reference: "expected_max" | "worst".

  Returns:
    Seconds.

  References: ALGORITHM.md section 4 (Tbar as a fraction of the dense-upload latency).
  """
  if reference not in DENSE_BUDGET_REFERENCES:
    raise ValueError(f"reference must be one of {DENSE_BUDGET_REFERENCES}, got {reference!r}")
  beta = np.asarray(beta, np.float64)
  n = beta.shape[0]
  k = clients_per_round
  if not 1 <= k <= n:
    raise ValueError(f"clients_per_round must be in [1, {n}], got {k}")
  share = np.full(n, cfg.bandwidth_hz / k)
  lat = client_latencies_s(np.broadcast_to(dense_bits, (n,)), share,
                           channel_lib.snr_coefficient_hz(beta, 1.0, cfg),
                           np.broadcast_to(compute_s, (n,)))
  if reference == "worst":
    return float(np.max(lat))
  lat = np.sort(lat)
  total = math.comb(n, k)
  # j is 1-based: the j-th smallest is the maximum of S when S holds it and K-1 smaller ones.
  weights = np.array([math.comb(j - 1, k - 1) / total for j in range(k, n + 1)])
  return float(np.dot(weights, lat[k - 1:]))


@dataclasses.dataclass(frozen=True)
class Link:
  """The run's fixed radio and device facts: one entry per client (index by client id)."""
  channel: channel_lib.ChannelConfig
  beta: np.ndarray  # [N] large-scale gains
  speeds: np.ndarray  # [N] device FLOP/s
  attenuation: np.ndarray | None = None  # [T, N] extra power gain per round (bursty fading)
  csi_error: float = 0.0  # the controller sees g (1 + eps), eps ~ N(0, csi_error^2)
  dropout: float = 0.0  # probability that a sampled client's upload is lost

  def gains(self, seed: int, t: int) -> np.ndarray:
    """[N] true small-scale power gains of round t: Rayleigh, times the burst attenuation."""
    g = channel_lib.fading(len(self.beta), seed, t)
    if self.attenuation is not None:
      g = g * self.attenuation[min(t, len(self.attenuation) - 1)]
    return g

  def compute_s(self, fl: ml_collections.ConfigDict, flops_per_example: float) -> np.ndarray:
    """[N] local training times c_k of one round (E steps of b examples)."""
    return compute_time_s(fl.local_steps, fl.batch_size, flops_per_example,
                                   self.speeds)


def channel_config(w: ml_collections.ConfigDict) -> channel_lib.ChannelConfig:
  """The `wireless` config section as a ChannelConfig (MHz and GFLOP/s to SI units)."""
  return channel_lib.ChannelConfig(
      radius_m=w.radius_m, min_distance_m=w.min_distance_m, tx_power_dbm=w.tx_power_dbm,
      noise_psd_dbm_hz=w.noise_psd_dbm_hz, bandwidth_hz=w.bandwidth_mhz * 1e6,
      shadowing_db=w.shadowing_db,
      device_flops_range=(w.device_gflops_min * 1e9, w.device_gflops_max * 1e9))


def make_link(config: ml_collections.ConfigDict) -> Link:
  """Places the N clients, draws their shadowing and device speeds (once per run)."""
  w = config.wireless
  cfg = channel_config(w)
  n = config.fl.num_clients
  beta = channel_lib.large_scale_gain(channel_lib.place_clients(n, cfg, config.seed), cfg, config.seed)
  attenuation = None
  if w.fading == "bursty":
    bad = channel_lib.burst_states(n, config.fl.rounds, config.seed, w.burst_p_bad, w.burst_p_good)
    attenuation = np.where(bad, 10.0 ** (-w.burst_depth_db / 10.0), 1.0)
  return Link(cfg, beta, channel_lib.device_speeds(n, cfg, config.seed), attenuation,
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
  return w.budget_fraction * dense_budget_s(
      dense_bits, link.beta, compute_s, link.channel, clients_per_round, w.budget_reference)
