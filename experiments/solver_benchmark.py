r"""Benchmark: the host-side TSFA solve per round (CVXPY and the NumPy twin) for K clients, and
its share of a round.

For each K: the CVXPY build + first solve (once per run), the median time of one
min-latency solve with each solver (and how many failed), and the per-round P3 as the
controller runs it (enumeration over m = 1..r with a non-empty queue, so every m is solved,
through the fallback chain starting at CVX or at the twin). The round-time share divides the P3
time by `K x per-client training time`, with the per-client time given for two setups:
  cpu:   measured, the CPU-scale quickstart on the project's 2-core VM (E1 dense r = 8:
         105 s of rounds / 80 rounds / 5 clients = 0.26 s per client);
  paper: projected, ViT-B/16 with 320 training examples per client per round at ~35 GFLOP each
         (11.2 TFLOP) on an accelerator sustaining 100 TFLOP/s: 0.11 s per client [assumption,
         not measured here: no accelerator was available].

  python -m experiments.solver_benchmark --out=/tmp/solver.json
"""

import statistics
import time

from absl import flags
import numpy as np

from experiments import common
from softjax.sparsify import payload
from softjax.tsfa import online, solvers
from softjax.wireless import channel as channel_lib

_KS = flags.DEFINE_list("clients", ["10", "100", "500"], "Clients per round K.")
_RANK = flags.DEFINE_integer("rank", 8, "LoRA rank r (P3 enumerates m = 1..r).")
_INSTANCES = flags.DEFINE_integer("instances", 5, "Random rounds per K (median over them).")
_CPU_CLIENT_S = flags.DEFINE_float("cpu_client_s", 0.26, "CPU-scale training s per client.")
_PAPER_CLIENT_S = flags.DEFINE_float("paper_client_s", 0.11, "Projected paper-scale s per client.")
_OUT = flags.DEFINE_string("out", None, "Write the records as JSON here.")

LAYERS = [(768, 768)] * 24  # ViT-B/16 query and value
HEAD_PARAMS = 768 * 100 + 100


def _round(k: int, seed: int, cfg: channel_lib.ChannelConfig):
  """One round's channel for K clients of a placed population, with fresh Rayleigh fading."""
  rng = np.random.default_rng(seed)
  beta = channel_lib.large_scale_gain(channel_lib.place_clients(k, cfg, seed), cfg, seed)
  a = channel_lib.snr_coefficient_hz(beta, rng.exponential(size=k), cfg)
  return a, rng.uniform(0.1, 0.5, k)


def _timed(fn, args_list) -> tuple[float, int]:
  """(median seconds per call, calls that raised); a failed call's time counts too."""
  times, failures = [], 0
  for args in args_list:
    start = time.perf_counter()
    try:
      fn(*args)
    except Exception:  # a solver failure is a result here, not an error of the benchmark
      failures += 1
    times.append(time.perf_counter() - start)
  return statistics.median(times), failures


def measure(k: int, rank: int, instances: int) -> dict:
  cfg = channel_lib.ChannelConfig()
  bits_fn = payload.upload_bits_fn(LAYERS, rank, 32, HEAD_PARAMS)
  rounds = [_round(k, seed, cfg) for seed in range(instances)]
  start = time.perf_counter()
  problem = solvers.MinLatencyProblem(k, cfg.bandwidth_hz)  # builds, checks DPP, compiles
  build_s = time.perf_counter() - start
  dense = np.full(k, float(bits_fn(rank)))
  cvx_s, cvx_failures = _timed(problem.solve, [(dense, a, c) for a, c in rounds])
  twin = lambda bits, a, c: solvers.min_latency_numpy(bits, a, c, cfg.bandwidth_hz)  # noqa: E731
  twin_s, twin_failures = _timed(twin, [(dense, a, c) for a, c in rounds])
  phi = lambda m: 1.0 - m / rank  # noqa: E731
  record = {"clients": k, "rank": rank, "instances": instances, "cvx_build_s": build_s,
            "cvx_solve_s": cvx_s, "cvx_failures": cvx_failures, "numpy_solve_s": twin_s,
            "numpy_failures": twin_failures}
  # The controller's real path: P3 by enumeration with the fallback chain.
  for primary in ("cvx", "numpy"):
    decisions = []

    def p3(a, c, primary=primary):
      p3_problem = online.P3Problem(range(1, rank + 1), phi, 1.0, 1.0, 1.0, bits_fn, a, c)
      decisions.append(online.solve_with_fallback(
          p3_problem, total_bw_hz=cfg.bandwidth_hz, cvx_problem=problem, primary=primary))

    record[f"p3_{primary}_s"], _ = _timed(p3, rounds)
    record[f"p3_{primary}_fallbacks"] = sum(d.fallbacks for d in decisions)
  for setup, per_client in (("cpu", _CPU_CLIENT_S.value), ("paper", _PAPER_CLIENT_S.value)):
    round_s = k * per_client
    record[f"{setup}_round_s"] = round_s
    record[f"p3_cvx_share_{setup}"] = record["p3_cvx_s"] / round_s
    record[f"p3_numpy_share_{setup}"] = record["p3_numpy_s"] / round_s
  return record


def main(argv):
  del argv
  records = []
  for k in (int(x) for x in _KS.value):
    r = measure(k, _RANK.value, _INSTANCES.value)
    records.append(r)
    print(f"K = {k:4d}: build {r['cvx_build_s']:6.2f} s | solve cvx {r['cvx_solve_s'] * 1e3:8.1f}"
          f" ms ({r['cvx_failures']}/{r['instances']} failed), numpy "
          f"{r['numpy_solve_s'] * 1e3:7.2f} ms | P3 (r = {r['rank']}, fallbacks "
          f"{r['p3_cvx_fallbacks']}) cvx "
          f"{r['p3_cvx_s'] * 1e3:8.1f} ms, numpy {r['p3_numpy_s'] * 1e3:7.2f} ms | share of a "
          f"round: cpu {r['p3_cvx_share_cpu']:.2%} / {r['p3_numpy_share_cpu']:.3%}, paper "
          f"{r['p3_cvx_share_paper']:.2%} / {r['p3_numpy_share_paper']:.3%} (cvx / numpy)",
          flush=True)
  common.write_json(_OUT.value, records)


if __name__ == "__main__":
  common.run_launcher(main)
