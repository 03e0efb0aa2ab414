"""The `accelerator` section of experiments/round_timing.py: the checks the design was made for,
in one command that fits a short lease on one GPU.

  python -m experiments.benchmark --scale=gpu --sections=accelerator --out=results/accel

At the gpu scale (ViT-B/16 at 224, rank 8 on query/value, K = 10, E = 5, b = 32, random
weights and examples: nothing to download) it measures, each in one process:
  clients      the round with all K clients vmapped (client_parallelism = K) vs sequential
               in-graph (lax.map, 1) vs a Python loop over K calls of one jitted client and a
               jitted FedAvg (how a framework without the in-graph round runs);
  sweep        one round of S = 16 members vmapped (each member's clients sequential in-graph)
               vs 16 separate runs, each a compilation and the same rounds: measured as one
               separate run, x 16 (the separate runs are identical programs);
  torch        the PyTorch + peft client loop (on CUDA where there is a GPU);
  memory       the device's peak bytes in use (where the backend reports it);
  flops        the vmapped round's FLOP/s against a large matmul's on the same device.
The test scale runs the same code in seconds on a CPU (tests/test_round_timing.py).
"""

from __future__ import annotations

import statistics
import time

SWEEP_MEMBERS = {"test": 2, "cpu": 4, "gpu": 16}
SWEEP_ROUNDS = 2  # timed rounds of each sweep arm: a 16-member round is 16 rounds' work


def time_python_loop(scale, rounds: int, seed: int = 0) -> dict:
  """A round as a Python loop: K calls of one jitted client update, then a jitted FedAvg of
  the returned models (dense uploads, weights by data size: all equal here)."""
  import jax
  import jax.numpy as jnp

  from experiments import round_timing
  from softjax.federated import client as client_lib
  from softjax.federated import types as fl_types

  _, frozen, head, lora, apply_fn, data = round_timing.round_inputs(scale, seed)
  update = jax.jit(client_lib.make_client_update(apply_fn, optimizer="sgd",
                                                 local_steps=scale.local_steps,
                                                 batch_size=scale.batch_size))
  average = jax.jit(lambda models: jax.tree.map(lambda *xs: sum(xs) / len(xs), *models))
  hparams, key = fl_types.make_hparams(0.03), jax.random.key(seed)
  glob = jax.device_put(fl_types.Trainable(lora=lora, head=head))

  def one_round(glob, t):
    round_key = jax.random.fold_in(key, t)
    models = [update(glob, frozen, data, jnp.int32(c), jax.random.fold_in(round_key, c),
                     hparams)[0] for c in range(scale.clients)]
    return jax.block_until_ready(average(models))

  start = time.perf_counter()
  glob = one_round(glob, 0)
  first = time.perf_counter() - start
  times = []
  for t in range(1, rounds + 1):
    start = time.perf_counter()
    glob = one_round(glob, t)
    times.append(time.perf_counter() - start)
  return {"first_call_s": first, "round_s": float(statistics.median(times)),
          "round_s_all": times}


def _peak_bytes() -> int | None:
  import jax
  stats = jax.devices()[0].memory_stats()
  return None if not stats else int(stats.get("peak_bytes_in_use", 0))


def section_accelerator(scale, scale_name: str, rounds: int) -> dict:
  from experiments import round_timing

  vmapped = round_timing.time_jax_round(scale, parallelism=scale.clients, rounds=rounds)
  sequential = round_timing.time_jax_round(scale, parallelism=1, rounds=rounds)
  loop = time_python_loop(scale, rounds)
  members = SWEEP_MEMBERS[scale_name]
  sweep = round_timing.time_jax_round(scale, parallelism=1, rounds=SWEEP_ROUNDS, members=members)
  one = round_timing.time_jax_round(scale, parallelism=1, rounds=SWEEP_ROUNDS)
  sweep_s = sweep["first_call_s"] + SWEEP_ROUNDS * sweep["round_s"]
  separate_s = members * (one["first_call_s"] + SWEEP_ROUNDS * one["round_s"])
  record = {
      "clients": {"vmapped": vmapped, "sequential": sequential, "python_loop": loop,
                  "sequential_over_vmapped": sequential["round_s"] / vmapped["round_s"],
                  "loop_over_vmapped": loop["round_s"] / vmapped["round_s"]},
      "sweep": {"members": members, "rounds": SWEEP_ROUNDS, "sweep": sweep, "one_run": one,
                "sweep_s": sweep_s, "separate_s": separate_s,
                "separate_over_sweep": separate_s / sweep_s},
      "torch": round_timing.section_torch(scale),
      "flops": round_timing.section_flops(scale, vmapped),
  }
  record["peak_device_bytes"] = _peak_bytes()  # after every arm (JAX's; torch ran apart)
  return record


def markdown(record: dict) -> list[str]:
  c, s, t, f = record["clients"], record["sweep"], record["torch"], record["flops"]
  peak = record["peak_device_bytes"]
  return [
      "| round, K clients | first call (s) | round (s) | vs vmapped |", "|---|---:|---:|---:|",
      f"| vmapped (client_parallelism = K) | {c['vmapped']['first_call_s']:.2f} | "
      f"{c['vmapped']['round_s']:.3f} | 1.00x |",
      f"| sequential in-graph (lax.map, 1) | {c['sequential']['first_call_s']:.2f} | "
      f"{c['sequential']['round_s']:.3f} | {c['sequential_over_vmapped']:.2f}x |",
      f"| Python loop of jitted clients | {c['python_loop']['first_call_s']:.2f} | "
      f"{c['python_loop']['round_s']:.3f} | {c['loop_over_vmapped']:.2f}x |", "",
      f"| {s['members']} settings, {s['rounds']} rounds | seconds |", "|---|---:|",
      f"| one vmapped sweep (compile + rounds) | {s['sweep_s']:.2f} |",
      f"| {s['members']} separate runs ({s['members']} x one measured run) | "
      f"{s['separate_s']:.2f} |",
      f"| **separate / sweep** | **{s['separate_over_sweep']:.2f}x** |", "",
      "| PyTorch + peft | value |", "|---|---:|",
      f"| torch {t['torch']['torch_version']} on {t['torch'].get('device', 'cpu')}, round (s) | "
      f"{t['torch']['round_s']:.3f} |",
      f"| softjax round (s), same arm | {t['softjax']['round_s']:.3f} |",
      f"| **PyTorch / softjax** | **{t['torch_over_softjax']:.2f}x** |", "",
      "| device | value |", "|---|---:|",
      f"| peak bytes in use (JAX) | {'not reported' if peak is None else f'{peak / 2**30:.2f} GiB'} |",
      f"| round FLOP/s (vmapped) | {f['round_flops_per_s'] / 1e12:.2f} TFLOP/s |",
      f"| {f['matmul_side']}^2 float32 matmul FLOP/s | {f['matmul_flops_per_s'] / 1e12:.2f} "
      "TFLOP/s |",
      f"| **utilization** | **{100 * f['utilization']:.1f} %** |", ""]
