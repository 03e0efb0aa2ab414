"""The benchmark's round and its timing, without flags: the problem sizes, the synthetic
round (random backbone and examples), and the measurements that other benchmark sections build
on (experiments/benchmark.py is the command line; accelerator_benchmark.py and
store_benchmark.py use these too).
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

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")

NO_YNN_DOTS = "--xla_cpu_experimental_ynn_fusion_type="

# The CPU speed levers experiments/cpu_levers.py times, here (no flags) so that tests can read
# them: name -> (XLA_FLAGS, client_parallelism); the first is the default the others compare with.
CPU_LEVERS = {
    "default": ("", 1),
    "parallelism_2": ("", 2),
    "all_clients_vmapped": ("", 0),  # 0: K
    "legacy_cpu_runtime": ("--xla_cpu_use_thunk_runtime=false", 1),
    "onednn": ("--xla_cpu_use_onednn=true", 1),
    "fast_math": ("--xla_cpu_enable_fast_math=true", 1),
    "single_thread_eigen": ("--xla_cpu_multi_thread_eigen=false", 1),
    # jaxlib 0.10's CPU backend hands dots to YNNPACK by default; an empty list of YNN fusion
    # types sends them back to XLA's own (Eigen) dot emitter.
    "eigen_dots": (NO_YNN_DOTS, 1),
    "eigen_dots_parallelism_2": (NO_YNN_DOTS, 2),
    "eigen_dots_all_clients": (NO_YNN_DOTS, 0),
    "xnnpack_dots": (NO_YNN_DOTS + " --xla_cpu_experimental_xnn_fusion_type="
                     "LIBRARY_FUSION_TYPE_DOT", 1),
}


def chosen_levers(names) -> dict[str, tuple[str, int]]:
  """Every lever, or the default (the baseline) and the named ones, in CPU_LEVERS' order."""
  from experiments import common

  names = common.chosen_names("arms", names, tuple(CPU_LEVERS))
  return {n: a for n, a in CPU_LEVERS.items() if not names or n == "default" or n in names}


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


def median(xs):
  return float(statistics.median(xs))


# ---------------------------------------------------------------------------------------------
# The softjax round on synthetic data (random backbone: timing only).


def model(scale: Scale, seed: int):
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


def round_inputs(scale: Scale, seed: int = 0, mesh=None):
  """(ViT config, frozen params, head, LoRA factors, apply_fn, federated data) on the devices:
  the benchmark's model and K clients of random examples."""
  import numpy as np

  from softjax.run import setup as setup_lib

  vit_config, frozen, head, lora, apply_fn = model(scale, seed)
  shape = (scale.image_size, scale.image_size, scale.channels)
  rng = np.random.default_rng(seed)
  n, k = scale.examples_per_client, scale.clients
  images = rng.integers(0, 256, (k * n,) + shape, dtype=np.uint8)
  labels = rng.integers(0, scale.num_classes, k * n).astype(np.int32)
  clients = [np.arange(i * n, (i + 1) * n) for i in range(k)]
  data = setup_lib.federated_data(images, labels, clients, mesh, shard=False)
  return vit_config, setup_lib.to_devices(frozen, mesh), head, lora, apply_fn, data


def make_jax_round(scale: Scale, parallelism: int, mesh_devices: int = 1, seed: int = 0,
                   members: int = 0):
  """(jitted round with the state donated, args builder, FLOPs per round, XLA step FLOPs).

  members > 0: the round of a sweep, vmapped over that many members (stacked states, each
  member its own key; one device), as the runner runs one; FLOPs are the members' total."""
  import jax
  import jax.numpy as jnp

  from softjax.federated import client as client_lib
  from softjax.federated import placement
  from softjax.federated import round as round_lib
  from softjax.federated import types as fl_types
  from softjax.models import apply as apply_lib
  from softjax.models import lora as lora_lib

  mesh = placement.make_mesh(mesh_devices, placement.CLIENTS)
  vit_config, frozen, head, lora, apply_fn, data = round_inputs(scale, seed, mesh)
  shape, k = (scale.image_size, scale.image_size, scale.channels), scale.clients
  state = fl_types.init_state(lora, head, num_clients=k, error_feedback=False)
  phases = round_lib.make_phases(apply_fn, optimizer="sgd", local_steps=scale.local_steps,
                                 batch_size=scale.batch_size, client_parallelism=parallelism)
  round_fn = placement.place_round(phases, mesh)
  ids = jnp.arange(k, dtype=jnp.int32)
  hparams = fl_types.make_hparams(0.03)
  key = jax.random.key(seed)
  if members:
    round_fn = jax.vmap(round_fn, in_axes=(0, None, None, 0, 0, 0))
    stack = lambda x: jnp.stack([x] * members)  # noqa: E731
    state, ids, hparams = (jax.tree.map(stack, tree) for tree in (state, ids, hparams))
    key = jax.random.split(key, members)
  step = jax.jit(round_fn, donate_argnums=0,
                 out_shardings=None if mesh is None else placement.round_out_shardings(state, mesh))

  def fresh_state():
    return (jax.device_put(state) if mesh is None
            else placement.place_state(state, mesh, stacked=False))

  layer_dims = [(d_in, d_out) for _, d_in, d_out in lora_lib.lora_layer_dims(lora)]
  per_example = apply_lib.model_flops_per_example(vit_config, scale.rank, layer_dims)
  round_flops = per_example * k * scale.local_steps * scale.batch_size * max(members, 1)

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
                   mesh_devices: int = 1, members: int = 0) -> dict:
  """First call (compile + run) and the median steady-state round, in seconds."""
  import jax

  rounds = rounds or scale.rounds
  call, fresh_state, round_flops, xla_step_flops = make_jax_round(scale, parallelism,
                                                                  mesh_devices, members=members)
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
  return {"first_call_s": first, "round_s": median(times), "round_s_all": times,
          "round_flops": round_flops, "xla_step_flops_x_KE": xla_step_flops,
          "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
          "parallelism": parallelism, "mesh_devices": mesh_devices, "members": members}



def best_parallelism(scale: Scale) -> int:
  """What fl.client_parallelism = 0 picks on this backend."""
  import jax

  from softjax.federated import schedule

  return schedule.default_parallelism(jax.default_backend(), scale.clients)


def section_torch(scale: Scale) -> dict:
  """The PyTorch arm runs in a subprocess: torch's OpenMP threads keep spinning after a run and
  slowed the JAX rounds measured after it in the same process by about 10 %."""
  jax_record = time_jax_round(scale, parallelism=best_parallelism(scale))
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
  matmul_flops_s = 2 * n ** 3 / median(times)
  round_flops_s = record["round_flops"] / record["round_s"]
  return {"round_flops": record["round_flops"], "xla_step_flops_x_KE":
          record["xla_step_flops_x_KE"](), "round_s": record["round_s"],
          "round_flops_per_s": round_flops_s, "matmul_side": n,
          "matmul_flops_per_s": matmul_flops_s, "utilization": round_flops_s / matmul_flops_s}


def cpu_name(record: dict) -> str:
  """'AMD EPYC (family 23, model 1)' from a `machine()` record (older records: the name)."""
  if record.get("cpu_family") is None:
    return record["cpu_model"]
  return (f"{record['cpu_model']} (family {record['cpu_family']}, model "
          f"{record['cpu_model_number']})")


def cpu() -> dict:
  """The CPU's model name, family and model number, and its flags that matter to XLA and torch
  (from /proc/cpuinfo; "unknown" and no flags elsewhere)."""
  model, flags_seen, generation = "unknown", set(), {}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown":
          model = value.strip()
        elif key == "flags" and not flags_seen:
          flags_seen = set(value.split())
        elif key in ("cpu family", "model") and key not in generation:
          # A VM may name only the vendor ("AMD EPYC"); family and model tell the generation.
          generation[key] = value.strip()
  except OSError:  # not Linux: the model stays unknown
    pass
  return {"cpu_model": model, "cpu_family": generation.get("cpu family"),
          "cpu_model_number": generation.get("model"),
          "cpu_flags": [f for f in CPU_FLAGS if f in flags_seen]}


def machine() -> dict:
  """`cpu()`, XLA_FLAGS and the library versions."""
  import jaxlib

  try:
    import torch
    torch_version = torch.__version__
  except ImportError:
    torch_version = None
  return {**cpu(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "jaxlib_version": jaxlib.__version__, "torch_version": torch_version}