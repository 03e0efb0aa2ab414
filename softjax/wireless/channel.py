"""The radio channel: client placement, path loss, shadowing, fading, bursts, CSI error, dropouts.

Everything here is a pure host-side NumPy function of (parameters, seed, round), so a resumed run
redraws exactly the channel of the uninterrupted run. Host random streams follow the project
convention `np.random.default_rng([seed, stream, ...])`; the stream ids below are reserved for the
wireless model (0 and 1 belong to client sampling and partitioning).

Units: distances in metres, bandwidth in Hz, times in seconds, powers in watts internally (the
config speaks dBm). The "SNR coefficient" of a client is `a_k = p * beta_k * g_k / N0` in Hz: the
SNR it would have on a 1 Hz band, so that on a band of `b` Hz its SNR is `a_k / b`.

References: ALGORITHM.md section 4.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from softjax.config import rules

# Host rng streams owned by this module: np.random.default_rng([seed, stream, ...]).
STREAM_PLACEMENT = 10


STREAM_FADING = 11


STREAM_SHADOWING = 12


STREAM_DEVICE_SPEED = 13


STREAM_BURSTS = 14


STREAM_CSI = 15


STREAM_DROPOUT = 16


@dataclasses.dataclass(frozen=True)
class ChannelConfig:
  """Parameters of the uplink and of the client devices.

  Attributes:
    radius_m: cell radius; clients lie in the annulus [min_distance_m, radius_m] around the base
      station (ALGORITHM.md 4: 500 m).
    min_distance_m: closest a client may be (ALGORITHM.md 4: 50 m).
    tx_power_dbm: client transmit power p (ALGORITHM.md 4: 23 dBm).
    noise_psd_dbm_hz: noise power spectral density N0 (ALGORITHM.md 4: -174 dBm/Hz).
    bandwidth_hz: total uplink bandwidth B_tot shared by FDMA (ALGORITHM.md 4: 20 MHz).
    shadowing_db: standard deviation of log-normal shadowing in dB, drawn once per client;
      0 turns it off (the default; ALGORITHM.md 4 names 8 dB for the switch).
    device_flops_range: client compute speed f_k in FLOP/s, uniform in this range and drawn once
      per client. ALGORITHM.md 4 leaves the range to the config; (1e9, 5e9) is this project's
      default [choice].

  References: ALGORITHM.md section 4.
  """

  radius_m: float = 500.0
  min_distance_m: float = 50.0
  tx_power_dbm: float = 23.0
  noise_psd_dbm_hz: float = -174.0
  bandwidth_hz: float = 20e6
  shadowing_db: float = 0.0
  device_flops_range: tuple[float, float] = (1e9, 5e9)

  def __post_init__(self):
    low, high = self.device_flops_range
    values = dataclasses.asdict(self) | dict(bandwidth=self.bandwidth_hz, device_flops_min=low,
                                             device_flops_max=high)
    names = {k: k for k in values} | {"bandwidth": "bandwidth_hz",
                                      "device_flops_min": "device_flops_range[0]",
                                      "device_flops_max": "device_flops_range[1]"}
    rules.cell(values, names, owner="ChannelConfig")

  @property
  def tx_power_w(self) -> float:
    """Transmit power p in watts."""
    return dbm_to_watt(self.tx_power_dbm)

  @property
  def noise_psd_w_hz(self) -> float:
    """Noise power spectral density N0 in W/Hz."""
    return dbm_to_watt(self.noise_psd_dbm_hz)


def dbm_to_watt(dbm):
  """Converts dBm to watts: 10^((dBm - 30) / 10).

  References: ALGORITHM.md section 4 (p in dBm, N0 in dBm/Hz).
  """
  return 10.0 ** ((np.asarray(dbm, dtype=np.float64) - 30.0) / 10.0)


def place_clients(num_clients: int, cfg: ChannelConfig, seed: int) -> np.ndarray:
  """Distances of the clients to the base station, uniform by area in the annulus.

  The radius is drawn as `sqrt(U (R^2 - r0^2) + r0^2)`, U ~ Uniform(0, 1): the inverse of the
  area CDF of an annulus, so clients are uniform over the disk rather than crowded at its
  centre. Only the distance matters to the channel, so no angle is drawn.

  Args:
    num_clients: N, every client of the run (placed once per run).
    cfg: the channel config (radius_m, min_distance_m).
    seed: the run seed; the stream is `default_rng([seed, 10])`.

  Returns:
    distances_m: [N] float64 distances in metres.

  References: ALGORITHM.md section 4.
  """
  rng = np.random.default_rng([seed, STREAM_PLACEMENT])
  u = rng.uniform(size=num_clients)
  r0, r1 = cfg.min_distance_m, cfg.radius_m
  return np.sqrt(u * (r1 ** 2 - r0 ** 2) + r0 ** 2)


def path_loss_db(d_m):
  """Path loss `128.1 + 37.6 log10(d / 1 km)` in dB (3GPP macro-cell model).

  Args:
    d_m: distance(s) in metres, > 0.

  Returns:
    Path loss in dB, same shape as `d_m`.

  References: ALGORITHM.md section 4.
  """
  return 128.1 + 37.6 * np.log10(np.asarray(d_m, dtype=np.float64) / 1000.0)


def large_scale_gain(distances_m, cfg: ChannelConfig, seed: int) -> np.ndarray:
  """Linear large-scale gain beta_k: path loss plus optional log-normal shadowing.

  Shadowing (when `cfg.shadowing_db > 0`) is one N(0, sigma^2) dB draw per client from
  `default_rng([seed, 12])`, fixed for the run like the placement: it models obstacles around a
  client that does not move.

  Args:
    distances_m: [N] client distances in metres.
    cfg: the channel config (shadowing_db).
    seed: the run seed.

  Returns:
    beta: [N] linear power gains (<< 1).

  References: ALGORITHM.md section 4.
  """
  loss_db = path_loss_db(distances_m)
  if cfg.shadowing_db > 0:
    rng = np.random.default_rng([seed, STREAM_SHADOWING])
    loss_db = loss_db + rng.normal(0.0, cfg.shadowing_db, size=loss_db.shape)
  return 10.0 ** (-loss_db / 10.0)


def device_speeds(num_clients: int, cfg: ChannelConfig, seed: int) -> np.ndarray:
  """Client compute speeds f_k in FLOP/s, uniform in `cfg.device_flops_range`, once per run.

  Args:
    num_clients: N.
    cfg: the channel config (device_flops_range).
    seed: the run seed; the stream is `default_rng([seed, 13])`.

  Returns:
    speeds: [N] FLOP/s.

  References: ALGORITHM.md section 4.
  """
  rng = np.random.default_rng([seed, STREAM_DEVICE_SPEED])
  low, high = cfg.device_flops_range
  return rng.uniform(low, high, size=num_clients)


def fading(num_clients: int, seed: int, round_index: int) -> np.ndarray:
  """Rayleigh block fading power gains g_k^t ~ Exp(1) of every client in one round.

  Drawn for all N clients (index by client id), so a client's channel in a round does not depend
  on which other clients were sampled.

  Args:
    num_clients: N.
    seed: the run seed.
    round_index: t; the stream is `default_rng([seed, 11, t])`.

  Returns:
    g: [N] power gains with mean 1.

  References: ALGORITHM.md section 4.
  """
  rng = np.random.default_rng([seed, STREAM_FADING, round_index])
  return rng.exponential(1.0, size=num_clients)


def burst_states(num_clients: int, rounds: int, seed: int, p_bad: float, p_good: float
                 ) -> np.ndarray:
  """Gilbert-Elliott bursts (E6): which clients are in the bad state in each round.

  Each client runs its own two-state Markov chain: good -> bad with probability p_bad per
  round, bad -> good with p_good, starting from the stationary law (bad with probability
  p_bad / (p_bad + p_good)). A client in the bad state sees its channel attenuated (see
  `burst_attenuation`), so deep fades last several rounds instead of being independent.

  Args:
    num_clients: N.
    rounds: T (states for rounds 0..T-1).
    seed: the run seed; the stream is `default_rng([seed, 14])`.
    p_bad, p_good: transition probabilities in [0, 1] (not both 0).

  Returns:
    bool [T, N], True = bad.

  References: ALGORITHM.md section 8, E6 (beyond the paper).
  """
  rng = np.random.default_rng([seed, STREAM_BURSTS])
  uniforms = rng.random((rounds, num_clients))
  bad = np.empty((rounds, num_clients), bool)
  state = uniforms[0] < p_bad / (p_bad + p_good)
  for t in range(rounds):
    if t:
      state = np.where(state, uniforms[t] >= p_good, uniforms[t] < p_bad)
    bad[t] = state
  return bad


def csi_estimate(g, error_std: float, seed: int, round_index: int) -> np.ndarray:
  """Imperfect CSI (E6): the gain the server plans with, `g_hat = g (1 + eps)`.

  eps ~ N(0, error_std^2) per client and round, clipped to [-0.9, inf) so the estimate stays
  positive [choice]. The controller solves P3 with g_hat; the round's realized latency uses g.

  Args:
    g: [N] true power gains of the round (all clients).
    error_std: standard deviation of eps; 0 returns g.
    seed: the run seed; the stream is `default_rng([seed, 15, t])`.
    round_index: t.

  References: ALGORITHM.md section 8, E6.
  """
  g = np.asarray(g, np.float64)
  if error_std == 0:
    return g
  eps = np.random.default_rng([seed, STREAM_CSI, round_index]).normal(0.0, error_std, g.shape)
  return g * (1.0 + np.maximum(eps, -0.9))


def dropouts(num_clients: int, probability: float, seed: int, round_index: int) -> np.ndarray:
  """Clients whose upload is lost in round t (E6): bool [N], True = dropped.

  Drawn for all N clients from `default_rng([seed, 16, t])`, independently with the given
  probability, so a client's fate does not depend on who else was sampled.

  References: ALGORITHM.md section 8, E6.
  """
  if probability == 0:
    return np.zeros(num_clients, bool)
  return np.random.default_rng([seed, STREAM_DROPOUT, round_index]).random(num_clients) < (
      probability)


def snr_coefficient_hz(beta, g, cfg: ChannelConfig) -> np.ndarray:
  """The SNR coefficient `a_k = p * beta_k * g_k / N0` in Hz (SNR on a band of b Hz is a_k / b).

  Args:
    beta: large-scale gains (linear).
    g: small-scale fading power gains (1 for the mean channel).
    cfg: the channel config (tx power, noise PSD).

  Returns:
    a: linear SNR coefficients in Hz, broadcast shape of beta and g.

  References: ALGORITHM.md section 4.
  """
  return cfg.tx_power_w * np.asarray(beta, np.float64) * np.asarray(g, np.float64) / (
      cfg.noise_psd_w_hz)
