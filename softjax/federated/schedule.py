"""Host-side per-round choices that are pure functions of (seed, round): who trains, at what rate.

References: ALGORITHM.md section 1 (K clients sampled uniformly without replacement).
"""

from __future__ import annotations

import jax
import numpy as np
import optax

HOST_STREAM_SAMPLING = 0  # host rng stream ids: np.random.default_rng([seed, stream, round])


def sample_clients(seed: int, round_index: int, num_clients: int, k: int) -> np.ndarray:
  """S_t: k distinct clients drawn uniformly, a pure function of (seed, round). Sorted, int32."""
  rng = np.random.default_rng([seed, HOST_STREAM_SAMPLING, round_index])
  return np.sort(rng.choice(num_clients, size=k, replace=False)).astype(np.int32)


def client_lr_schedule(rounds: int, peak: float, schedule: str,
                       final_fraction: float) -> optax.Schedule:
  """The client learning rate as an optax schedule over the round index (0-based).

  cosine: peak * (f + (1 - f) * (1 + cos(pi * t / (T - 1))) / 2), from peak at the first round
  to f * peak at the last (optax.cosine_decay_schedule with T - 1 decay steps and alpha = f).
  Under non-IID data, late rounds with small steps stop the global model from swinging toward
  whichever clients were sampled last.
  """
  if schedule == "constant" or rounds <= 1:
    return optax.constant_schedule(peak)
  return optax.cosine_decay_schedule(peak, decay_steps=rounds - 1, alpha=final_fraction)


def client_lr_at(round_index: int, rounds: int, peak: float, schedule: str,
                 final_fraction: float) -> float:
  """`client_lr_schedule` at round `round_index`, evaluated on the host CPU in float64.

  float64 because optax computes in the input's precision: in float32, 45 of the quickstart's
  80 rates come out one ulp away from the float32 nearest the exact value; in float64 all 80
  round to it, so a run's rates do not depend on how the schedule is evaluated.
  """
  fn = client_lr_schedule(rounds, peak, schedule, final_fraction)
  with jax.enable_x64(True), jax.default_device(jax.devices("cpu")[0]):
    return float(fn(np.float64(round_index)))


def default_parallelism(backend: str, clients: int) -> int:
  """fl.client_parallelism = 0: how many of `clients` slots one device trains at once.

  A CPU runs them one after another inside the compiled program: one client's matmuls already
  keep its cores busy. On the 2-core machine of docs/benchmarks.md, 2 at a time was 3-13 %
  faster than 1 (within run-to-run noise of the same size), 3 to K were slower; 1 is kept since
  it also keeps the recorded CPU results reproducible bit for bit (a vmap changes rounding). A
  GPU or TPU vmaps all of them, since one client's batch leaves most of the chip idle.
  """
  return 1 if backend == "cpu" else clients
