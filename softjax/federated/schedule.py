"""Host-side per-round choices that are pure functions of (seed, round): who trains, at what rate.

References: ALGORITHM.md section 1 (K clients sampled uniformly without replacement).
"""

from __future__ import annotations

import numpy as np

HOST_STREAM_SAMPLING = 0  # host rng stream ids: np.random.default_rng([seed, stream, round])


def sample_clients(seed: int, round_index: int, num_clients: int, k: int) -> np.ndarray:
  """S_t: k distinct clients drawn uniformly, a pure function of (seed, round). Sorted, int32."""
  rng = np.random.default_rng([seed, HOST_STREAM_SAMPLING, round_index])
  return np.sort(rng.choice(num_clients, size=k, replace=False)).astype(np.int32)


def client_lr_at(round_index: int, rounds: int, peak: float, schedule: str,
                 final_fraction: float) -> float:
  """The client learning rate of round `round_index` (0-based), computed on the host.

  cosine: peak * (f + (1 - f) * (1 + cos(pi * t / (T - 1))) / 2), from peak at the first round
  to f * peak at the last. Under non-IID data, late rounds with small steps stop the global
  model from swinging toward whichever clients were sampled last.
  """
  if schedule == "constant" or rounds <= 1:
    return peak
  progress = round_index / (rounds - 1)
  return peak * (final_fraction + (1 - final_fraction) * 0.5 * (1 + np.cos(np.pi * progress)))


def default_parallelism(backend: str, clients: int) -> int:
  """fl.client_parallelism = 0: how many of `clients` slots one device trains at once.

  A CPU runs them one after another inside the compiled program: one client's matmuls already
  keep its cores busy. On the 2-core machine of docs/benchmarks.md, 2 at a time was 3-13 %
  faster than 1 (within run-to-run noise of the same size), 3 to K were slower; 1 is kept since
  it also keeps the recorded CPU results reproducible bit for bit (a vmap changes rounding). A
  GPU or TPU vmaps all of them, since one client's batch leaves most of the chip idle.
  """
  return 1 if backend == "cpu" else clients
