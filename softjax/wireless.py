"""Simulated wireless uplink: placement, channel gains, FDMA rates, compute and round latency.

Everything here is a pure host-side NumPy function of (parameters, seed, round), so a resumed run
redraws exactly the channel of the uninterrupted run. Host random streams follow the project
convention `np.random.default_rng([seed, stream, ...])`; the stream ids below are reserved for the
wireless model (0 and 1 belong to client sampling and partitioning).

Units: distances in metres, bandwidth in Hz, rates in bit/s, times in seconds, powers in watts
internally (the config speaks dBm). The "SNR coefficient" of a client is
`a_k = p * beta_k * g_k / N0` in Hz: the SNR it would have on a 1 Hz band, so that on a band of
`b` Hz its SNR is `a_k / b` and its rate `b * log2(1 + a_k / b)`.

References: ALGORITHM.md section 4.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

# Host rng streams owned by this module: np.random.default_rng([seed, stream, ...]).
STREAM_PLACEMENT = 10
STREAM_FADING = 11
STREAM_SHADOWING = 12
STREAM_DEVICE_SPEED = 13
STREAM_BURSTS = 14
STREAM_CSI = 15
STREAM_DROPOUT = 16

DENSE_BUDGET_REFERENCES = ("expected_max", "worst")


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
    if not 0 < self.min_distance_m < self.radius_m:
      raise ValueError(f"need 0 < min_distance_m < radius_m, got {self.min_distance_m}, "
                       f"{self.radius_m}")
    if self.bandwidth_hz <= 0:
      raise ValueError(f"bandwidth_hz must be > 0, got {self.bandwidth_hz}")
    if self.shadowing_db < 0:
      raise ValueError(f"shadowing_db must be >= 0, got {self.shadowing_db}")
    low, high = self.device_flops_range
    if not 0 < low <= high:
      raise ValueError(f"device_flops_range must satisfy 0 < low <= high, got {(low, high)}")

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


def flops_per_example(*, seq_len: int, width: int, depth: int, mlp_dim: int, num_classes: int,
                      patch_dim: int = 0, lora_rank: int = 0,
                      lora_layer_dims: Sequence[tuple[int, int]] = ()) -> float:
  """Training FLOPs of one example through a ViT with frozen weights and LoRA adapters.

  Approximation [choice]: count only matrix multiplications (layer norms, softmax, GELU and
  residual adds are elementwise and small next to them), at 2 FLOPs per multiply-accumulate.
  - forward: patch embedding, per block the q/k/v/out projections (4 L D^2), the attention
    scores and weighted sum (2 L^2 D) and the MLP (2 L D M), the LoRA paths
    (L r (d_in + d_out) per adapted matrix) and the head on the cls token;
  - backward: the activation gradient flows back through every block (one more pass of the
    block MACs, LoRA paths included), but weight gradients are needed only for the LoRA
    factors and the head. The frozen patch embedding lies below every adapter, so no gradient
    goes through it. The weight gradient of a frozen matrix would cost another forward pass,
    which is why the total is about 2x the forward FLOPs rather than the usual 3x of full
    fine-tuning. It assumes the lowest block carries adapters (true for the default targets).

  Args:
    seq_len: tokens through the encoder (patches + cls token).
    width: model width D.
    depth: number of encoder blocks.
    mlp_dim: MLP hidden size M.
    num_classes: head outputs.
    patch_dim: values per patch (patch_size^2 * channels); 0 skips the embedding cost.
    lora_rank: r (0: no adapters).
    lora_layer_dims: (d_in, d_out) of every adapted matrix over all blocks (the same list
      `payload.lora_upload_bits` takes).

  Returns:
    FLOPs per training example (forward + backward).

  References: ALGORITHM.md section 4.
  """
  tokens = seq_len
  block_macs = depth * (4 * tokens * width ** 2 + 2 * tokens ** 2 * width
                        + 2 * tokens * width * mlp_dim)
  lora_macs = tokens * lora_rank * sum(d_in + d_out for d_in, d_out in lora_layer_dims)
  head_macs = width * num_classes
  embed_macs = (seq_len - 1) * patch_dim * width
  forward = embed_macs + block_macs + lora_macs + head_macs
  # Activation gradients flow back from the head through every block and LoRA path; weight
  # gradients are taken for the trainable parts (LoRA factors, head) only.
  activation_grads = head_macs + block_macs + lora_macs
  weight_grads = head_macs + lora_macs
  backward = activation_grads + weight_grads
  return 2.0 * float(forward + backward)


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
                           snr_coefficient_hz(beta, 1.0, cfg),
                           np.broadcast_to(compute_s, (n,)))
  if reference == "worst":
    return float(np.max(lat))
  lat = np.sort(lat)
  total = math.comb(n, k)
  # j is 1-based: the j-th smallest is the maximum of S when S holds it and K-1 smaller ones.
  weights = np.array([math.comb(j - 1, k - 1) / total for j in range(k, n + 1)])
  return float(np.dot(weights, lat[k - 1:]))
