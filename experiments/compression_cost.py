"""Client-side compression cost of an upload method, timed like with like.

Times one client's `compress` (ALGORITHM.md 2.2-2.4 vs 7) on LoRA factors of a given size,
jitted, after a warm-up call, as the median of several calls, all in one process.
Used by experiments/compression_benchmark.py and the E1 driver.
"""

from __future__ import annotations

import statistics
import time
from typing import Sequence

import jax
import jax.numpy as jnp

from softjax.sparsify import sparsifier as sparsifiers


def random_lora(key: jax.Array, layers: int, d_in: int, d_out: int, rank: int) -> dict:
  """A LoRA tree of `layers` adapted matrices with random factors."""
  keys = jax.random.split(key, 2 * layers)
  return {f"layer_{i:02d}": {"A": jax.random.normal(keys[2 * i], (rank, d_in)) / d_in**0.5,
                             "B": 0.01 * jax.random.normal(keys[2 * i + 1], (d_out, rank))}
          for i in range(layers)}


def time_compress(method: str, lora_global: dict, lora_local: dict, keep_ratio: float,
                  repeats: int) -> float:
  """Median seconds of one jitted client compression (warm, results on the host)."""
  sparsifier = sparsifiers.make_sparsifier(method)
  residual = jax.tree.map(jnp.zeros_like, lora_global)
  fn = jax.jit(sparsifier.compress)
  args = (lora_global, lora_local, residual, jnp.float32(keep_ratio), jax.random.key(0))
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def compare(ranks: Sequence[int], *, dim: int, layers: int, keep_ratio: float = 0.5,
            repeats: int = 5, methods: Sequence[str] = ("soft", "slora")) -> list[dict]:
  """One record per rank: seconds per method and slora / soft."""
  records = []
  for rank in ranks:
    glob = random_lora(jax.random.key(0), layers, dim, dim, rank)
    local = random_lora(jax.random.key(1), layers, dim, dim, rank)
    record = {"rank": rank, "dim": dim, "layers": layers, "device": jax.devices()[0].device_kind}
    for method in methods:
      record[f"{method}_s"] = time_compress(method, glob, local, keep_ratio, repeats)
    if "soft" in methods and "slora" in methods:
      record["slora_over_soft"] = record["slora_s"] / record["soft_s"]
    records.append(record)
  return records
