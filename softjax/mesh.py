"""Scaling past one device: a 1-D device mesh, explicit shardings, multi-host feeding.

The mesh has one axis. Without a sweep it is `clients`: the K sampled clients of a round are
split across the devices (`federated.make_round(mesh=...)` runs them under `jax.shard_map`),
the frozen backbone and the global factors are replicated, the error-feedback residuals of all
N clients are sharded along N, and aggregation is an ordinary weighted sum over the
client-sharded uploads, for which the compiler inserts the all-reduce. With a sweep the axis is
`members`: each device runs S / D settings of the vmapped round.

Multi-host (TPU pods, Slurm): `jax.distributed.initialize()` first, then every process feeds
only its own clients' training examples. Clients go to processes in contiguous blocks
(`client_owner`), and the training set is laid out client-major, one equal-size block of rows
per process (`client_major_layout`), so process p's block holds exactly its clients' examples
and is passed to `jax.make_array_from_process_local_data`. Host-side work (sampling, the
channel, the TSFA solve) is a pure function of (seed, round), so every process computes the
same plan without communicating.

Leading-axis conventions: `[K, ...]` sampled clients, `[N, ...]` all clients, `[S, ...]` sweep
members, `[M, ...]` training examples.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PyTree = Any

CLIENTS = "clients"  # the mesh axis of a run without a sweep
MEMBERS = "members"  # the mesh axis of a sweep


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0,
                           process_id: int = -1) -> None:
  """Joins a multi-process JAX job (mesh.distributed = True).

  Empty / 0 / -1 arguments let JAX detect the cluster (TPU pod metadata, Slurm's SLURM_*
  variables, Open MPI; the coordinator also from $JAX_COORDINATOR_ADDRESS). It must run before
  anything touches a device, so `experiment.run` calls it first. On CPUs the processes talk
  through gloo (JAX's default), which is how the tests run two processes on one machine.
  """
  jax.distributed.initialize(coordinator_address=coordinator_address or None,
                             num_processes=num_processes or None,
                             process_id=None if process_id < 0 else process_id)


def make_mesh(devices: int, axis: str) -> Mesh | None:
  """A 1-D mesh over the first `devices` devices (0 = all); None for a single device."""
  count = jax.device_count() if devices == 0 else devices
  if count > jax.device_count():
    raise ValueError(f"mesh.devices = {devices} but JAX sees {jax.device_count()} devices "
                     f"({jax.devices()[0].platform})")
  if count == 1:
    return None
  return Mesh(np.asarray(jax.devices()[:count]), (axis,))


def mesh_size(mesh: Mesh | None) -> int:
  return 1 if mesh is None else mesh.devices.size


def padded_count(k: int, mesh: Mesh | None) -> int:
  """Client slots in a round: K rounded up to a multiple of the device count. The extra slots
  train a copy of a real client and weigh nothing (pad-and-mask, no recompile)."""
  d = mesh_size(mesh)
  return -(-k // d) * d


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def along_axis(mesh: Mesh) -> NamedSharding:
  """Sharded along the leading axis over the mesh's one axis."""
  return NamedSharding(mesh, P(mesh.axis_names[0]))


def leading_sharding(mesh: Mesh, leading: int) -> NamedSharding:
  """Along the leading axis when it divides evenly over the devices, else replicated."""
  return along_axis(mesh) if leading % mesh_size(mesh) == 0 else replicated(mesh)


def place(tree: PyTree, sharding: NamedSharding | PyTree) -> PyTree:
  """Host arrays -> global arrays with `sharding`, each process passing the same full values.

  On one process this is `jax.device_put`; on several, every process holds the whole (small)
  array and contributes the shards its devices own.
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  shardings = (jax.tree.map(lambda _: sharding, tree) if isinstance(sharding, NamedSharding)
               else sharding)
  return jax.tree.map(
      lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x)[idx]),
      tree, shardings)


def client_owner(num_clients: int, num_processes: int) -> np.ndarray:
  """The process that feeds client k: contiguous blocks, owner(k) = floor(k P / N). int32 [N]."""
  return (np.arange(num_clients, dtype=np.int64) * num_processes // num_clients).astype(np.int32)


class ClientMajorLayout(NamedTuple):
  """Where every client's examples sit in the device-resident training set."""
  rows: np.ndarray  # int64 [M_pad]: source example of each row; -1 = padding (never indexed)
  table: np.ndarray  # int32 [N, max_n]: client k's rows, padded with 0 (never reached)
  counts: np.ndarray  # int32 [N]
  owner: np.ndarray  # int32 [N]: the process that feeds the client
  block_rows: int  # rows per process block; process p holds rows [p * block, (p + 1) * block)


def client_major_layout(clients: Sequence[np.ndarray], num_processes: int = 1,
                        multiple: int = 1) -> ClientMajorLayout:
  """Lays the training set out client by client, one equal-size block per process.

  Client k's examples are rows offset_k .. offset_k + n_k - 1 of its owner's block, in the
  order of its index list, so the example at position j of its table row is clients[k][j] as
  before: the layout moves examples, never changes which one a client sees where.

  Args:
    clients: one array of source example indices per client (e.g. from `partition`).
    num_processes: P, the processes feeding the mesh.
    multiple: each block is padded to a multiple of this (devices per process), so the rows
      split evenly over every device.
  """
  n = len(clients)
  owner = client_owner(n, num_processes)
  counts = np.array([len(c) for c in clients], np.int32)
  per_process = [int(counts[owner == p].sum()) for p in range(num_processes)]
  block = max(1, -(-max(per_process) // multiple) * multiple)
  rows = np.full(num_processes * block, -1, np.int64)
  table = np.zeros((n, max(1, int(counts.max(initial=0)))), np.int32)
  fill = np.arange(num_processes) * block  # next free row of each block
  for k, ix in enumerate(clients):
    start = fill[owner[k]]
    rows[start:start + len(ix)] = ix
    table[k, :len(ix)] = np.arange(start, start + len(ix))
    fill[owner[k]] += len(ix)
  return ClientMajorLayout(rows=rows, table=table, counts=counts, owner=owner, block_rows=block)


def gather_rows(array: np.ndarray, rows: np.ndarray) -> np.ndarray:
  """array[rows] with zeros where rows is -1 (padding)."""
  out = array[np.maximum(rows, 0)]
  out[rows < 0] = 0
  return out


def place_examples(array: np.ndarray, layout: ClientMajorLayout, mesh: Mesh | None,
                   shard: bool) -> jax.Array:
  """The training set ([M_pad, ...] in the layout's rows) on the mesh.

  shard=False replicates it on every device (one process only). shard=True splits the rows over
  the devices; each process builds only its own block from its clients' examples.
  """
  if mesh is None or not shard:
    full = gather_rows(array, layout.rows)
    return jax.device_put(full) if mesh is None else place(full, replicated(mesh))
  p, block = jax.process_index(), layout.block_rows
  local = gather_rows(array, layout.rows[p * block:(p + 1) * block])
  global_shape = (len(layout.rows),) + array.shape[1:]
  return jax.make_array_from_process_local_data(along_axis(mesh), local, global_shape)


def state_shardings(state: PyTree, mesh: Mesh) -> PyTree:
  """The layout a clients-mesh round keeps a federated.ServerState in, one sharding per leaf:
  the global model and the round counter replicated, the [N, ...] residuals split along N
  (replicated when N does not divide evenly)."""
  rep = replicated(mesh)
  return state._replace(
      trainable=jax.tree.map(lambda _: rep, state.trainable), round=rep,
      residuals=jax.tree.map(lambda x: leading_sharding(mesh, x.shape[0]), state.residuals))


def place_state(state: PyTree, mesh: Mesh, stacked: bool) -> PyTree:
  """A federated.ServerState on the mesh: `state_shardings`, or for a sweep's stacked [S, ...]
  state every leaf split along the members axis."""
  return place(state, along_axis(mesh) if stacked else state_shardings(state, mesh))
