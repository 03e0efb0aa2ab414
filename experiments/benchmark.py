r"""Benchmark of the federated round: speed against PyTorch + peft, and where the time goes.

Every figure is measured side by side in one run on one machine and reported as a ratio:

  torch        softjax's jitted round vs the same federated LoRA round in eager PyTorch + peft
               (experiments/torch_reference.py: a sequential Python loop over the clients, as
               Flower / OpenFedLLM-style simulations run), same ViT, targets, K, E, b, data.
  parallelism  client_parallelism = 1, 2, ..., K (the lax.map batch over clients).
  mesh         unsharded vs the clients mesh on D = 2, 4 fake CPU devices (a subprocess with
               JAX_NUM_CPU_DEVICES, so the other sections keep one device), or real devices.
  flops        the round's FLOP/s (analytic training FLOPs, checked against XLA's count for one
               local step) vs a large matmul's FLOP/s in the same process.
  compile      first call (trace + compile + run) vs a steady-state round.
  host         per-round host time (sampling, channel, TSFA solve, metrics rows) as a share of
               the round, from a real `experiment.run` with the OSFA controller.
  clients      device bytes, host bytes and round time against N and K, per-client state on
               the device vs on the host (experiments/store_benchmark.py).
  rules        (not in the default list) E7's round per aggregation rule and SOFT, every rule
               on one machine, interleaved passes (experiments/rule_benchmark.py; --rules
               picks some beside FedIT):
               python -m experiments.benchmark --sections=rules --rounds=8 --passes=4 --out=DIR
  accelerator  (not in the default list) the GPU check: vmapped vs sequential vs Python-loop
               clients, a 16-member sweep vs 16 runs, torch on CUDA, peak memory, FLOP
               utilization (experiments/accelerator_benchmark.py):
               python -m experiments.benchmark --scale=gpu --sections=accelerator --out=DIR

Every record names the machine: CPU model and the flags that matter to XLA and torch (AVX-512,
AMX), core count, XLA_FLAGS, and the JAX, jaxlib and torch versions.

  python -m experiments.benchmark --out=results/bench                  # CPU scale, all sections
  python -m experiments.benchmark --scale=gpu --out=results/bench_gpu  # ViT-B/16 on a GPU
  python -m experiments.benchmark --scale=test --out=/tmp/b            # seconds (tests)

Writes DIR/benchmark.json (every record) and DIR/benchmark.md (the tables).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

from absl import flags

from experiments import common
from experiments.round_timing import (
  CPU_FLAGS,
  SCALES,
  Scale,
  best_parallelism,
  cpu_name,
  median,
  machine,
  section_flops,
  section_torch,
  time_jax_round,
)

_OUT = flags.DEFINE_string("out", None, "Directory for benchmark.json and benchmark.md.")
_SCALE = flags.DEFINE_enum("scale", "cpu", ["test", "cpu", "gpu"], "Problem size.")
_SECTIONS = flags.DEFINE_list("sections", "torch,parallelism,mesh,flops,compile,host,clients",
                              "Which measurements to run.")
_ROUNDS = flags.DEFINE_integer("rounds", 0, "Timed rounds per arm; 0 = the scale's default.")
_PASSES = flags.DEFINE_integer("passes", 2, "Interleaved passes over the arms (rules section).")
_RULES = flags.DEFINE_list("rules", [], "Rules section: the arms to time beside FedIT (default: "
                          "every rule and SOFT).")
_DEVICES = flags.DEFINE_list("devices", "2,4", "Mesh sizes for the mesh section.")
_CHILD = flags.DEFINE_string("child", None, "Internal: run one section in this subprocess.")

SECTIONS = ("torch", "parallelism", "mesh", "flops", "compile", "host", "clients", "rules",
            "accelerator")


# ---------------------------------------------------------------------------------------------
# Sections.


def section_parallelism(scale: Scale) -> dict:
  runs = [time_jax_round(scale, parallelism=p) for p in range(1, scale.clients + 1)]
  base = runs[0]["round_s"]
  for r in runs:
    r["speedup_vs_1"] = base / r["round_s"]
  best = min(runs, key=lambda r: r["round_s"])
  return {"runs": runs, "best_parallelism": best["parallelism"]}


def section_mesh(scale: Scale, devices: list[int]) -> dict:
  """Runs in a subprocess with max(devices) fake CPU devices unless real ones are there."""
  import jax

  if jax.default_backend() != "cpu" and jax.device_count() >= max(devices):
    return _mesh_records(scale, devices)
  env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(max(devices)), "JAX_PLATFORMS": "cpu"}
  done = subprocess.run(
      [sys.executable, "-m", "experiments.benchmark", f"--scale={_SCALE.value}",
       f"--rounds={_ROUNDS.value}", f"--devices={','.join(map(str, devices))}",
       "--child=mesh"], env=env, capture_output=True, text=True, check=False)
  if done.returncode != 0:
    raise RuntimeError(f"mesh benchmark subprocess failed:\n{done.stderr[-3000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def _mesh_records(scale: Scale, devices: list[int]) -> dict:
  import jax

  base = time_jax_round(scale, parallelism=1)
  runs = []
  for d in devices:
    # Each device maps its share of the clients sequentially, as the unsharded CPU default.
    r = time_jax_round(scale, parallelism=1, mesh_devices=d)
    r["speedup_vs_unsharded"] = base["round_s"] / r["round_s"]
    runs.append(r)
  return {"unsharded": base, "sharded": runs, "fake_devices": jax.default_backend() == "cpu"}


def section_compile(record: dict) -> dict:
  return {"first_call_s": record["first_call_s"], "round_s": record["round_s"],
          "compile_over_round": (record["first_call_s"] - record["round_s"]) / record["round_s"]}


def section_host(scale: Scale) -> dict:
  """A real run (OSFA + SOFT, CVX solver every round) with a random backbone; eval only at
  the end and no checkpoints in between, so the rows' times are the rounds'."""
  from softjax import config as config_lib
  from softjax.run import experiment

  config = config_lib.load(scale.host_config).unlock()
  config.model.backbone = "random"
  config.eval.every = config.checkpoint.every = config.fl.rounds
  config.eval.num_examples = 500
  with tempfile.TemporaryDirectory() as tmp:
    rows = experiment.run(config, tmp)["rows"][1:]  # round 1 holds the compilation
  host = [r["host_time_s"] for r in rows]
  solver = [r["solver_time_s"] for r in rows]
  total = [r["round_time_s"] for r in rows]
  return {"config": scale.host_config, "rounds_timed": len(rows), "host_s": median(host),
          "solver_s": median(solver), "round_s": median(total),
          "host_share": median([h / t for h, t in zip(host, total)]),
          "solver_share": median([s / t for s, t in zip(solver, total)])}


# ---------------------------------------------------------------------------------------------


def measure(scale_name: str, sections: list[str], devices: list[int]) -> dict:
  import jax

  scale = SCALES[scale_name]
  if _ROUNDS.value:
    scale = dataclasses.replace(scale, rounds=_ROUNDS.value)
  unknown = sorted(set(sections) - set(SECTIONS))
  if unknown:
    raise SystemExit(f"error: --sections has {unknown}; allowed: {', '.join(SECTIONS)}")
  record = {"scale": dataclasses.asdict(scale), "backend": jax.default_backend(),
            "device": str(jax.devices()[0].device_kind), "device_count": jax.device_count(),
            "cpu_count": os.cpu_count(), "jax_version": jax.__version__,
            "date": time.strftime("%Y-%m-%d"), **machine()}
  if "torch" in sections:
    record["torch"] = section_torch(scale)
  base = record.get("torch", {}).get("softjax")
  if "parallelism" in sections:
    record["parallelism"] = section_parallelism(scale)
    base = base or record["parallelism"]["runs"][0]
  if "mesh" in sections:
    record["mesh"] = section_mesh(scale, devices)
  if base is None and ({"flops", "compile"} & set(sections)):
    base = time_jax_round(scale, parallelism=best_parallelism(scale))
  if "flops" in sections:
    record["flops"] = section_flops(scale, base)
  if "compile" in sections:
    record["compile"] = section_compile(base)
  if "host" in sections:
    record["host"] = section_host(scale)
  if "clients" in sections:
    from experiments import store_benchmark
    record["clients"] = store_benchmark.section_clients(scale, scale_name, scale.rounds)
  if "rules" in sections:
    from experiments import rule_benchmark
    record["rules"] = rule_benchmark.section_rules(scale_name, scale.rounds, _PASSES.value,
                                                     _RULES.value or None)
  if "accelerator" in sections:
    from experiments import accelerator_benchmark
    record["accelerator"] = accelerator_benchmark.section_accelerator(scale, scale_name,
                                                                      scale.rounds)
  return _jsonable(record)


def _jsonable(obj):
  if isinstance(obj, dict):
    return {k: _jsonable(v) for k, v in obj.items() if not callable(v)}
  if isinstance(obj, list):
    return [_jsonable(v) for v in obj]
  return obj


def markdown(record: dict) -> str:
  """The tables of docs/benchmarks.md from one record."""
  s = record["scale"]
  seen = ", ".join(record["cpu_flags"]) or "none"
  missing = ", ".join(f for f in CPU_FLAGS if f not in record["cpu_flags"]) or "none"
  lines = [f"Scale `{s['variant']}` {s['image_size']}x{s['image_size']}x{s['channels']}, rank "
           f"{s['rank']} on query/value, K = {s['clients']}, E = {s['local_steps']}, b = "
           f"{s['batch_size']}; backend {record['backend']} ({record['device']}), "
           f"{record['cpu_count']} CPU cores, JAX {record['jax_version']}, {record['date']}.",
           "", f"Machine: {cpu_name(record)} (has {seen}; lacks {missing}), "
           f"jaxlib {record['jaxlib_version']}, torch {record['torch_version']}, XLA_FLAGS "
           f"'{record['xla_flags']}'.", ""]
  if "torch" in record:
    t = record["torch"]
    lines += ["| round | seconds |", "|---|---:|",
              f"| softjax (jit, client_parallelism {t['softjax']['parallelism']}) | "
              f"{t['softjax']['round_s']:.3f} |",
              f"| PyTorch {t['torch']['torch_version']} + peft {t['torch']['peft_version']} "
              f"(eager, client loop, {t['torch']['threads']} threads) | "
              f"{t['torch']['round_s']:.3f} |",
              f"| **PyTorch / softjax** | **{t['torch_over_softjax']:.2f}x** |", ""]
  if "parallelism" in record:
    lines += ["| client_parallelism | round (s) | speed-up vs 1 |", "|---:|---:|---:|"]
    lines += [f"| {r['parallelism']} | {r['round_s']:.3f} | {r['speedup_vs_1']:.2f}x |"
              for r in record["parallelism"]["runs"]]
    lines += [""]
  if "mesh" in record:
    m = record["mesh"]
    kind = "fake CPU devices" if m["fake_devices"] else "devices"
    lines += [f"| mesh ({kind}) | round (s) | speed-up vs unsharded |", "|---|---:|---:|",
              f"| unsharded | {m['unsharded']['round_s']:.3f} | 1.00x |"]
    lines += [f"| {r['mesh_devices']} devices | {r['round_s']:.3f} | "
              f"{r['speedup_vs_unsharded']:.2f}x |" for r in m["sharded"]]
    lines += [""]
  if "flops" in record:
    f = record["flops"]
    lines += ["| FLOPs | value |", "|---|---:|",
              f"| round, analytic (matmuls, forward + backward) | {f['round_flops']:.3e} |",
              f"| round, XLA count of one step x K x E | {f['xla_step_flops_x_KE']:.3e} |",
              f"| round FLOP/s | {f['round_flops_per_s'] / 1e9:.1f} GFLOP/s |",
              f"| {f['matmul_side']}^2 float32 matmul FLOP/s | "
              f"{f['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s |",
              f"| **utilization** | **{100 * f['utilization']:.1f} %** |", ""]
  if "compile" in record:
    c = record["compile"]
    lines += ["| compile | seconds |", "|---|---:|",
              f"| first call (trace + compile + run) | {c['first_call_s']:.2f} |",
              f"| steady round | {c['round_s']:.3f} |",
              f"| (first - steady) / steady | {c['compile_over_round']:.1f} rounds |", ""]
  if "host" in record:
    h = record["host"]
    lines += [f"Host overhead (`{h['config']}`, random backbone, median of "
              f"{h['rounds_timed']} rounds):", "", "| per round | seconds | share |",
              "|---|---:|---:|", f"| whole round | {h['round_s']:.3f} | 100 % |",
              f"| host: sampling, channel, solve, rows | {h['host_s']:.4f} | "
              f"{100 * h['host_share']:.1f} % |",
              f"| of which the P3 solve | {h['solver_s']:.4f} | "
              f"{100 * h['solver_share']:.1f} % |", ""]
  if "clients" in record:
    from experiments import store_benchmark
    lines += store_benchmark.markdown(record["clients"])
  if "rules" in record:
    from experiments import rule_benchmark
    lines += rule_benchmark.markdown(record["rules"])
  if "accelerator" in record:
    from experiments import accelerator_benchmark
    lines += accelerator_benchmark.markdown(record["accelerator"])
  return "\n".join(lines)


def main(argv):
  del argv

  common.quiet_libraries()
  devices = [int(d) for d in _DEVICES.value]
  if _CHILD.value == "mesh":
    scale = SCALES[_SCALE.value]
    if _ROUNDS.value:
      scale = dataclasses.replace(scale, rounds=_ROUNDS.value)
    print(json.dumps(_jsonable(_mesh_records(scale, devices))))
    return
  record = common.exit_on_user_error(measure, _SCALE.value, _SECTIONS.value, devices)
  text = markdown(record)
  print(text)
  if _OUT.value:
    os.makedirs(_OUT.value, exist_ok=True)
    common.write_json(os.path.join(_OUT.value, "benchmark.json"), record)
    with open(os.path.join(_OUT.value, "benchmark.md"), "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  common.run_launcher(main)
