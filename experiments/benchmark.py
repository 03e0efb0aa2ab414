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
import statistics
import subprocess
import sys
import tempfile
import time

from absl import flags

from experiments import common

_OUT = flags.DEFINE_string("out", None, "Directory for benchmark.json and benchmark.md.")
_SCALE = flags.DEFINE_enum("scale", "cpu", ["test", "cpu", "gpu"], "Problem size.")
_SECTIONS = flags.DEFINE_list("sections", "torch,parallelism,mesh,flops,compile,host,clients",
                              "Which measurements to run.")
_ROUNDS = flags.DEFINE_integer("rounds", 0, "Timed rounds per arm; 0 = the scale's default.")
_DEVICES = flags.DEFINE_list("devices", "2,4", "Mesh sizes for the mesh section.")
_CHILD = flags.DEFINE_string("child", None, "Internal: run one section in this subprocess.")

SECTIONS = ("torch", "parallelism", "mesh", "flops", "compile", "host", "clients")
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")


@dataclasses.dataclass(frozen=True)
class Scale:
  """One problem size: the model, the clients and their local training."""
  variant: str
  image_size: int
  channels: int
  num_classes: int
  rank: int
  alpha: float
  clients: int  # K sampled per round
  local_steps: int  # E
  batch_size: int  # b
  examples_per_client: int
  rounds: int  # timed rounds per arm
  matmul: int  # side of the square matmul that measures the machine's FLOP/s
  host_config: str  # launcher spec of the host-overhead run (OSFA, SOFT)


SCALES = {
    "test": Scale("tiny", 8, 1, 10, 4, 8.0, 3, 2, 4, 24, 2, 256,
                  "configs/tsfa.py:controller=osfa,scale=test,rounds=3"),
    # The quickstart's round: cpu_small ViT on 28x28 Fashion-MNIST, rank 8 on q/v, K = 5,
    # E = 5, b = 32, 1500 examples a client (half of the 60k over 20 clients).
    "cpu": Scale("cpu_small", 28, 1, 10, 8, 32.0, 5, 5, 32, 1500, 5, 2048,
                 "configs/tsfa.py:controller=osfa,scale=cpu,rounds=12"),
    # The paper's round: ViT-B/16 at 224x224, K = 10 (all vmapped), E = 5, b = 32.
    "gpu": Scale("B/16", 224, 3, 100, 8, 16.0, 10, 5, 32, 500, 5, 8192,
                 "configs/tsfa.py:controller=osfa,scale=cpu,rounds=12"),
}


def _median(xs):
  return float(statistics.median(xs))


# ---------------------------------------------------------------------------------------------
# The softjax round on synthetic data (random backbone: timing only).


def _model(scale: Scale, seed: int):
  """(ViT config, frozen params, head, LoRA factors, apply_fn) of the benchmark's model."""
  import jax

  from softjax.models import apply as apply_lib
  from softjax.models import lora as lora_lib
  from softjax.models import vit

  vit_config = vit.make_vit_config(scale.variant, image_size=scale.image_size,
                                   channels=scale.channels, num_classes=scale.num_classes)
  model = vit.VisionTransformer(vit_config, vit.LoRAConfig(rank=scale.rank, alpha=scale.alpha,
                                                           targets=("query", "value")))
  shape = (scale.image_size, scale.image_size, scale.channels)
  params = lora_lib.init_params(model, jax.random.key(seed), shape)
  frozen, head = lora_lib.split_head(params)
  lora = lora_lib.init_lora(model, jax.random.key(seed + 1), shape)
  return vit_config, frozen, head, lora, apply_lib.make_apply_fn(model)


def make_jax_round(scale: Scale, parallelism: int, mesh_devices: int = 1, seed: int = 0):
  """(jitted round with the state donated, args builder, FLOPs per round, XLA step FLOPs)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from softjax.federated import client as client_lib
  from softjax.federated import placement
  from softjax.federated import round as round_lib
  from softjax.federated import types as fl_types
  from softjax.models import apply as apply_lib
  from softjax.models import lora as lora_lib
  from softjax.run import setup as setup_lib

  vit_config, frozen, head, lora, apply_fn = _model(scale, seed)
  shape = (scale.image_size, scale.image_size, scale.channels)
  rng = np.random.default_rng(seed)
  n, k = scale.examples_per_client, scale.clients
  images = rng.integers(0, 256, (k * n,) + shape, dtype=np.uint8)
  labels = rng.integers(0, scale.num_classes, k * n).astype(np.int32)
  clients = [np.arange(i * n, (i + 1) * n) for i in range(k)]
  mesh = placement.make_mesh(mesh_devices, placement.CLIENTS)
  data = setup_lib.federated_data(images, labels, clients, mesh, shard=False)
  frozen = setup_lib.to_devices(frozen, mesh)
  state = fl_types.init_state(lora, head, num_clients=k, error_feedback=False)
  phases = round_lib.make_phases(apply_fn, optimizer="sgd", local_steps=scale.local_steps,
                                 batch_size=scale.batch_size, client_parallelism=parallelism)
  step = jax.jit(placement.place_round(phases, mesh), donate_argnums=0,
                 out_shardings=None if mesh is None else placement.round_out_shardings(state, mesh))
  ids = jnp.arange(k, dtype=jnp.int32)
  hparams = fl_types.make_hparams(0.03)
  key = jax.random.key(seed)

  def fresh_state():
    return (jax.device_put(state) if mesh is None
            else placement.place_state(state, mesh, stacked=False))

  layer_dims = [(d_in, d_out) for _, d_in, d_out in lora_lib.lora_layer_dims(lora)]
  per_example = apply_lib.model_flops_per_example(vit_config, scale.rank, layer_dims)
  round_flops = per_example * k * scale.local_steps * scale.batch_size

  def xla_step_flops():
    """XLA's FLOP count of one local step (value_and_grad on one batch), x K x E."""
    trainable = fl_types.Trainable(lora=lora, head=head)
    x = jnp.zeros((scale.batch_size,) + shape, jnp.float32)
    y = jnp.zeros((scale.batch_size,), jnp.int32)
    grad = jax.jit(jax.value_and_grad(
        lambda t: client_lib.cross_entropy(apply_fn(frozen, t, x), y)))
    cost = grad.lower(trainable).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan"))) * k * scale.local_steps

  def call(s):
    return step(s, frozen, data, ids, key, hparams)

  return call, fresh_state, round_flops, xla_step_flops


def time_jax_round(scale: Scale, parallelism: int = 1, rounds: int | None = None,
                   mesh_devices: int = 1) -> dict:
  """First call (compile + run) and the median steady-state round, in seconds."""
  import jax

  rounds = rounds or scale.rounds
  call, fresh_state, round_flops, xla_step_flops = make_jax_round(scale, parallelism,
                                                                  mesh_devices)
  state = fresh_state()
  start = time.perf_counter()
  state, metrics = call(state)
  jax.block_until_ready(metrics)
  first = time.perf_counter() - start
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    state, metrics = call(state)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return {"first_call_s": first, "round_s": _median(times), "round_s_all": times,
          "round_flops": round_flops, "xla_step_flops_x_KE": xla_step_flops,
          "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
          "parallelism": parallelism, "mesh_devices": mesh_devices}


# ---------------------------------------------------------------------------------------------
# Sections.


def _best_parallelism(scale: Scale) -> int:
  """What fl.client_parallelism = 0 picks on this backend."""
  import jax

  from softjax.federated import schedule

  return schedule.default_parallelism(jax.default_backend(), scale.clients)


def section_torch(scale: Scale) -> dict:
  """The PyTorch arm runs in a subprocess: torch's OpenMP threads keep spinning after a run and
  slowed the JAX rounds measured after it in the same process by about 10 %."""
  jax_record = time_jax_round(scale, parallelism=_best_parallelism(scale))
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "torch.json")
    done = subprocess.run(
        [sys.executable, "-m", "experiments.torch_reference", f"--variant={scale.variant}",
         f"--image_size={scale.image_size}", f"--channels={scale.channels}",
         f"--num_classes={scale.num_classes}", f"--rank={scale.rank}", f"--alpha={scale.alpha}",
         f"--clients={scale.clients}", f"--local_steps={scale.local_steps}",
         f"--batch_size={scale.batch_size}", f"--examples_per_client={scale.examples_per_client}",
         f"--rounds={scale.rounds}", "--warmup=1", f"--out={out}"],
        capture_output=True, text=True, check=False)
    if done.returncode != 0:
      raise RuntimeError(f"PyTorch benchmark subprocess failed:\n{done.stderr[-3000:]}")
    with open(out) as f:
      torch_record = json.load(f)
  return {"softjax": jax_record, "torch": torch_record,
          "torch_over_softjax": torch_record["round_s"] / jax_record["round_s"]}


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


def section_flops(scale: Scale, jax_record: dict) -> dict:
  import jax
  import jax.numpy as jnp

  record = jax_record
  n = scale.matmul
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  matmul = jax.jit(lambda x, y: x @ y)
  jax.block_until_ready(matmul(a, a))
  times = []
  for _ in range(5):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a, a))
    times.append(time.perf_counter() - start)
  matmul_flops_s = 2 * n ** 3 / _median(times)
  round_flops_s = record["round_flops"] / record["round_s"]
  return {"round_flops": record["round_flops"], "xla_step_flops_x_KE":
          record["xla_step_flops_x_KE"](), "round_s": record["round_s"],
          "round_flops_per_s": round_flops_s, "matmul_side": n,
          "matmul_flops_per_s": matmul_flops_s, "utilization": round_flops_s / matmul_flops_s}


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
  return {"config": scale.host_config, "rounds_timed": len(rows), "host_s": _median(host),
          "solver_s": _median(solver), "round_s": _median(total),
          "host_share": _median([h / t for h, t in zip(host, total)]),
          "solver_share": _median([s / t for s, t in zip(solver, total)])}


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
    base = time_jax_round(scale, parallelism=_best_parallelism(scale))
  if "flops" in sections:
    record["flops"] = section_flops(scale, base)
  if "compile" in sections:
    record["compile"] = section_compile(base)
  if "host" in sections:
    record["host"] = section_host(scale)
  if "clients" in sections:
    from experiments import store_benchmark
    record["clients"] = store_benchmark.section_clients(_model, scale, scale_name, scale.rounds)
  return _jsonable(record)


def machine() -> dict:
  """The CPU model and its flags that matter here, XLA_FLAGS and the library versions."""
  import jaxlib

  model, flags_seen = "unknown", set()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model == "unknown":
          model = value.strip()
        elif key.strip() == "flags" and not flags_seen:
          flags_seen = set(value.split())
  except OSError:  # not Linux: the model stays unknown
    pass
  try:
    import torch
    torch_version = torch.__version__
  except ImportError:
    torch_version = None
  return {"cpu_model": model, "cpu_flags": [f for f in CPU_FLAGS if f in flags_seen],
          "xla_flags": os.environ.get("XLA_FLAGS", ""), "jaxlib_version": jaxlib.__version__,
          "torch_version": torch_version}


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
  lines = [f"Scale `{s['variant']}` {s['image_size']}x{s['image_size']}x{s['channels']}, rank "
           f"{s['rank']} on query/value, K = {s['clients']}, E = {s['local_steps']}, b = "
           f"{s['batch_size']}; backend {record['backend']} ({record['device']}), "
           f"{record['cpu_count']} CPU cores, JAX {record['jax_version']}, {record['date']}.",
           "", f"Machine: {record['cpu_model']} (flags: {seen} of {', '.join(CPU_FLAGS)}), "
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
