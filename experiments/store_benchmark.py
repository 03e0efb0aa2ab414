"""The `clients` section of experiments/benchmark.py: memory and round time against N and K, for
per-client state on the device (`fl.client_store = device`) and on the host (`host`).

Each arm is SOFT with error feedback and the server's re-orthogonalization (so the host store's
lazy change of basis is exercised): N clients share a fixed training set (the data on the device
does not grow with N), K are sampled per round, E = 1 local step of batch 8 (memory, not
training, is measured; the round's speed is the `torch` section's). Reported per arm:
  device bytes   the live JAX arrays the run holds after its last round (`jax.live_arrays`),
                 and, where the backend reports it (GPU, TPU), the device's bytes in use;
  host bytes     the host store's arrays (0 on the device store) and the process's RSS;
  round          median wall time of a round, the host's gather and scatter included.
On a CPU "device" arrays are host memory too, so there the live-array bytes are the figure that
shows what an accelerator would hold.
"""

from __future__ import annotations

import gc
import statistics
import time

# (N values, K values, examples in the shared training set) per benchmark scale.
GRID = {"test": ((12, 24), (3,), 96),
        "cpu": ((100, 1_000, 10_000), (10, 100), 20_000),
        "gpu": ((100, 1_000, 10_000), (10, 100), 20_000)}
STORES = ("device", "host")
LOCAL_STEPS, BATCH = 1, 8


def _live_bytes() -> int:
  import jax
  return sum(x.nbytes for x in jax.live_arrays())


def _device_in_use() -> int | None:
  import jax
  stats = jax.devices()[0].memory_stats()
  return None if not stats else int(stats.get("bytes_in_use", 0))


def _rss_bytes() -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) * 1024
  return 0


def measure_arm(scale, num_clients: int, k: int, store: str, examples: int, rounds: int,
                seed: int = 0) -> dict:
  """One (N, K, store) arm of the benchmark's model (round_timing.model) at `scale`."""
  import jax
  import numpy as np

  from experiments.round_timing import model
  from softjax.federated import client_store, schedule
  from softjax.federated import round as round_lib
  from softjax.federated import types as fl_types
  from softjax.run import setup as setup_lib
  from softjax.sparsify import sparsifier as sparsifiers

  gc.collect()
  before = _live_bytes()
  _, frozen, head, lora, apply_fn = model(scale, seed)
  shape = (scale.image_size, scale.image_size, scale.channels)
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (examples,) + shape, dtype=np.uint8)
  labels = rng.integers(0, scale.num_classes, examples).astype(np.int32)
  clients = np.array_split(rng.permutation(examples), num_clients)
  data = setup_lib.federated_data(images, labels, clients, None, shard=False)
  frozen = jax.device_put(frozen)
  host = store == "host"
  sparsifier = sparsifiers.make_sparsifier("soft")
  state = jax.device_put(fl_types.init_state(lora, head, k if host else num_clients,
                                             error_feedback=True))
  phases = round_lib.make_phases(apply_fn, optimizer="sgd", local_steps=LOCAL_STEPS,
                                 batch_size=BATCH, client_parallelism=1, sparsifier=sparsifier,
                                 reorthogonalize=True, host_store=host, num_clients=num_clients)
  step = jax.jit(round_lib.assemble(phases), donate_argnums=0)
  rows = (client_store.ClientStore.initial(client_store.fields_of(state), num_clients, False,
                                           True) if host else None)
  if rows is not None:
    rows.start(0)
  hparams, key, times = fl_types.make_hparams(0.03, keep_ratio=0.5), jax.random.key(seed), []
  for t in range(rounds + 1):  # round 0 compiles
    start = time.perf_counter()
    ids = schedule.sample_clients(seed, t, num_clients, k)
    if rows is not None:
      state = state._replace(**jax.device_put(rows.gather([ids])))
    state, metrics = step(state, frozen, data, ids, key, hparams)
    metrics = jax.tree.map(np.asarray, metrics)
    if rows is not None:
      rows.scatter([ids], client_store.fields_of(state), metrics.bases)
    times.append(time.perf_counter() - start)
  record = {"num_clients": num_clients, "k": k, "store": store,
            "device_bytes": _live_bytes() - before, "device_in_use": _device_in_use(),
            "host_store_bytes": 0 if rows is None else rows.nbytes(), "rss_bytes": _rss_bytes(),
            "round_s": float(statistics.median(times[1:])), "rounds_timed": rounds}
  del state, data, frozen, rows
  return record


def section_clients(scale, scale_name: str, rounds: int) -> dict:
  """Every (K, N, store) arm of the scale's grid (K <= N), and device bytes' growth in N."""
  ns, ks, examples = GRID[scale_name]
  arms = [measure_arm(scale, n, k, store, examples, rounds)
          for k in ks for n in ns if k <= n for store in STORES]
  growth = {}
  for k in ks:
    for store in STORES:
      mine = [a for a in arms if a["k"] == k and a["store"] == store]
      if len(mine) > 1:
        growth[f"{store}_k{k}"] = mine[-1]["device_bytes"] / mine[0]["device_bytes"] - 1.0
  return {"arms": arms, "device_growth_smallest_to_largest_n": growth, "examples": examples,
          "local_steps": LOCAL_STEPS, "batch_size": BATCH}


def markdown(record: dict) -> list[str]:
  mib = lambda b: f"{b / 2**20:.2f}"  # noqa: E731
  lines = [f"Per-client state on the device vs on the host (`fl.client_store`): SOFT with error "
           f"feedback and re-orthogonalization, {record['examples']} training examples shared "
           f"by the N clients, E = {record['local_steps']}, b = {record['batch_size']}; "
           "device bytes = live JAX arrays after the last round.", "",
           "| K | N | store | device (MiB) | host store (MiB) | RSS (MiB) | round (s) |",
           "|---:|---:|---|---:|---:|---:|---:|"]
  for a in record["arms"]:
    lines.append(f"| {a['k']} | {a['num_clients']} | {a['store']} | {mib(a['device_bytes'])} | "
                 f"{mib(a['host_store_bytes'])} | {mib(a['rss_bytes'])} | {a['round_s']:.3f} |")
  growth = ", ".join(f"{k}: {100 * v:+.1f} %"
                     for k, v in record["device_growth_smallest_to_largest_n"].items())
  return lines + ["", f"Device bytes from the smallest to the largest N: {growth}.", ""]
