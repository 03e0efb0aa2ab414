"""Wireless model (ALGORITHM.md 4): hand values, monotonicity, determinism by seed."""

import itertools
import math
import re

import numpy as np
import pytest

from softjax.models import apply as apply_lib
from softjax.wireless import channel as channel_lib
from softjax.wireless import link as link_lib


def test_config_defaults_match_algorithm_md():
  cfg = channel_lib.ChannelConfig()
  assert (cfg.radius_m, cfg.min_distance_m) == (500.0, 50.0)
  assert (cfg.tx_power_dbm, cfg.noise_psd_dbm_hz, cfg.bandwidth_hz) == (23.0, -174.0, 20e6)
  assert cfg.shadowing_db == 0.0
  # 23 dBm = 10^(-0.7) W ~ 0.1995 W; -174 dBm/Hz = 10^(-20.4) W/Hz.
  assert cfg.tx_power_w == pytest.approx(0.19953, rel=1e-4)
  assert cfg.noise_psd_w_hz == pytest.approx(3.98107e-21, rel=1e-5)
  with pytest.raises(ValueError):
    channel_lib.ChannelConfig(min_distance_m=600.0)


def test_path_loss_hand_values():
  assert channel_lib.path_loss_db(1000.0) == pytest.approx(128.1)
  assert channel_lib.path_loss_db(100.0) == pytest.approx(128.1 - 37.6)
  np.testing.assert_allclose(channel_lib.path_loss_db([1000.0, 10000.0]), [128.1, 165.7])


def test_large_scale_gain_without_and_with_shadowing():
  cfg = channel_lib.ChannelConfig()
  d = np.array([100.0, 1000.0])
  np.testing.assert_allclose(channel_lib.large_scale_gain(d, cfg, seed=0),
                             10 ** (-np.array([90.5, 128.1]) / 10), rtol=1e-12)
  shadowed = channel_lib.ChannelConfig(shadowing_db=8.0)
  d = np.full(4000, 300.0)
  beta = channel_lib.large_scale_gain(d, shadowed, seed=3)
  np.testing.assert_array_equal(beta, channel_lib.large_scale_gain(d, shadowed, seed=3))
  shadow_db = -10 * np.log10(beta) - channel_lib.path_loss_db(d)
  assert abs(shadow_db.mean()) < 0.5 and shadow_db.std() == pytest.approx(8.0, rel=0.05)


def test_placement_in_annulus_deterministic_and_uniform_by_area():
  cfg = channel_lib.ChannelConfig()
  d = channel_lib.place_clients(20000, cfg, seed=1)
  assert d.min() >= 50.0 and d.max() <= 500.0
  np.testing.assert_array_equal(d, channel_lib.place_clients(20000, cfg, seed=1))
  assert not np.array_equal(d[:10], channel_lib.place_clients(10, cfg, seed=2))
  # Area-uniform: the share inside 300 m is the annulus area ratio, not the radius ratio.
  share = (300 ** 2 - 50 ** 2) / (500 ** 2 - 50 ** 2)
  assert np.mean(d <= 300.0) == pytest.approx(share, abs=0.015)


def test_fading_mean_one_and_seeded_by_round():
  g = np.concatenate([channel_lib.fading(1000, seed=0, round_index=t) for t in range(20)])
  assert g.min() >= 0
  assert g.mean() == pytest.approx(1.0, abs=4 / math.sqrt(g.size))  # 4 standard errors
  np.testing.assert_array_equal(channel_lib.fading(5, 0, 7), channel_lib.fading(5, 0, 7))
  assert not np.array_equal(channel_lib.fading(5, 0, 7), channel_lib.fading(5, 0, 8))


def test_device_speeds_in_range():
  cfg = channel_lib.ChannelConfig(device_flops_range=(2e9, 3e9))
  f = channel_lib.device_speeds(500, cfg, seed=0)
  assert f.min() >= 2e9 and f.max() <= 3e9
  np.testing.assert_array_equal(f, channel_lib.device_speeds(500, cfg, seed=0))


def test_rate_hand_values_and_shape():
  # 1 MHz at SNR 3 (a = 3 MHz): 1e6 * log2(4) = 2 Mbit/s; SNR 1: 1 Mbit/s.
  np.testing.assert_allclose(link_lib.rate_bps([1e6, 1e6, 2e6], [3e6, 1e6, 6e6]),
                             [2e6, 1e6, 4e6], rtol=1e-12)
  np.testing.assert_array_equal(link_lib.rate_bps([0.0, 1e6], [5e6, 0.0]), [0.0, 0.0])
  b = np.linspace(1e4, 5e7, 400)
  r = link_lib.rate_bps(b, 1e7)
  assert np.all(np.diff(r) > 0)  # increasing
  assert np.all(np.diff(r, 2) < 0)  # concave
  assert r[-1] < 1e7 / math.log(2)  # below the power-limited ceiling a / ln 2
  assert link_lib.rate_bps(1e12, 1e7) == pytest.approx(1e7 / math.log(2), rel=1e-4)


def test_snr_coefficient_hand_value():
  cfg = channel_lib.ChannelConfig()
  beta = 10 ** (-128.1 / 10)
  expected = 10 ** (-0.7) * beta * 2.0 / 10 ** (-20.4)
  assert channel_lib.snr_coefficient_hz(beta, 2.0, cfg) == pytest.approx(expected, rel=1e-12)


def test_round_latency_hand_values():
  # Client 0: 4 Mbit at 2 Mbit/s after 0.5 s of compute = 2.5 s; client 1: 1 Mbit at 1 Mbit/s
  # after 0.2 s = 1.2 s. The round waits for the slower.
  lat = link_lib.client_latencies_s([4e6, 1e6], [1e6, 1e6], [3e6, 1e6], [0.5, 0.2])
  np.testing.assert_allclose(lat, [2.5, 1.2])
  assert link_lib.round_latency_s([4e6, 1e6], [1e6, 1e6], [3e6, 1e6], [0.5, 0.2]) == 2.5
  assert link_lib.round_latency_s([4e6, 1e6], [1e6, 0.0], [3e6, 1e6], [0.5, 0.2]) == math.inf
  # Nothing to send: only compute counts, bandwidth or not.
  assert link_lib.round_latency_s([0.0, 1e6], [0.0, 1e6], [3e6, 1e6], [0.5, 0.2]) == 1.2


def test_latency_never_increases_with_more_bandwidth_or_gain():
  rng = np.random.default_rng(0)
  for _ in range(20):
    bits = rng.uniform(1e5, 1e7, 6)
    b = rng.uniform(1e5, 5e6, 6)
    a = rng.uniform(1e5, 1e9, 6)
    c = rng.uniform(0, 1, 6)
    base = link_lib.client_latencies_s(bits, b, a, c)
    k = rng.integers(6)
    more_b, more_a = b.copy(), a.copy()
    more_b[k] *= rng.uniform(1, 3)
    more_a[k] *= rng.uniform(1, 3)
    assert np.all(link_lib.client_latencies_s(bits, more_b, a, c) <= base)
    assert np.all(link_lib.client_latencies_s(bits, b, more_a, c) <= base)


def test_compute_time_and_flops_hand_values():
  # 5 steps x 32 examples x 1 GFLOP at 2 GFLOP/s = 80 s.
  assert link_lib.compute_time_s(5, 32, 1e9, 2e9) == pytest.approx(80.0)
  np.testing.assert_allclose(link_lib.compute_time_s(1, 1, 4.0, np.array([1.0, 2.0])),
                             [4.0, 2.0])
  # seq 2, width 1, depth 1, mlp 1, one class: block MACs 4*2 + 2*4 + 2*2 = 20, head 1.
  # forward 21; backward = activation grads (1 + 20) + head weight grad 1 = 22; 2 FLOPs/MAC.
  tiny = dict(seq_len=2, width=1, depth=1, mlp_dim=1, num_classes=1)
  assert apply_lib.flops_per_example(**tiny) == 2 * (21 + 22)
  # One rank-1 adapter on a 1x1 matrix: 2 tokens x (1 + 1) = 4 MACs forward, 4 for its input
  # gradient and 4 for its weight gradient.
  assert apply_lib.flops_per_example(**tiny, lora_rank=1, lora_layer_dims=[(1, 1)]) == (
      2 * (21 + 4 + 22 + 8))
  # Patch embedding counts once (no gradient flows into the frozen embedding).
  assert apply_lib.flops_per_example(**tiny, patch_dim=3) == 2 * (21 + 3 + 22)


def test_flops_are_about_twice_the_forward_pass_for_a_real_vit():
  # cpu_small on 28x28 images: 49 patches + cls, width 128, depth 6, mlp 512, q and v adapters.
  dims = [(128, 128)] * 12
  total = apply_lib.flops_per_example(seq_len=50, width=128, depth=6, mlp_dim=512, num_classes=10,
                                     patch_dim=16, lora_rank=8, lora_layer_dims=dims)
  forward = 2 * (6 * (4 * 50 * 128 ** 2 + 2 * 50 ** 2 * 128 + 2 * 50 * 128 * 512)
                 + 49 * 16 * 128 + 50 * 8 * 256 * 12 + 1280)
  assert 1.9 < total / forward < 2.1


def test_dense_budget_matches_brute_force_over_subsets():
  cfg = channel_lib.ChannelConfig()
  rng = np.random.default_rng(0)
  beta = channel_lib.large_scale_gain(channel_lib.place_clients(6, cfg, 0), cfg, 0)
  compute = rng.uniform(0.1, 1.0, 6)
  bits = 2e6
  k = 3
  lat = link_lib.client_latencies_s(np.full(6, bits), np.full(6, cfg.bandwidth_hz / k),
                                    channel_lib.snr_coefficient_hz(beta, 1.0, cfg), compute)
  brute = np.mean([max(lat[list(s)]) for s in itertools.combinations(range(6), k)])
  assert link_lib.dense_budget_s(bits, beta, compute, cfg, k) == pytest.approx(brute, rel=1e-12)
  assert link_lib.dense_budget_s(bits, beta, compute, cfg, k, reference="worst") == (
      pytest.approx(lat.max()))
  # By hand with nothing to send: latencies = compute = 1, 2, 3 and K = 2: subsets {1,2}, {1,3},
  # {2,3} have maxima 2, 3, 3, mean 8/3.
  assert link_lib.dense_budget_s(0, beta[:3], [1.0, 2.0, 3.0], cfg, 2) == pytest.approx(8 / 3)
  with pytest.raises(ValueError):
    link_lib.dense_budget_s(bits, beta, compute, cfg, k, reference="median")


@pytest.mark.parametrize("field, kwargs", [
    ("min_distance_m", dict(min_distance_m=600.0)),
    ("tx_power_dbm", dict(tx_power_dbm=float("nan"))),
    ("bandwidth_hz", dict(bandwidth_hz=0.0)),
    ("shadowing_db", dict(shadowing_db=-1.0)),
    ("device_flops_range[1]", dict(device_flops_range=(2e9, 1e9))),
])
def test_a_channel_built_by_hand_is_checked_by_the_config_rules(field, kwargs):
  """ChannelConfig and config.wireless share config.rules.cell; each names its own field."""
  with pytest.raises(ValueError, match=rf"^ChannelConfig\.{re.escape(field)} = "):
    channel_lib.ChannelConfig(**kwargs)
