"""Scaling past one device: a 1-D device mesh, explicit shardings, multi-host feeding.

The mesh has one axis. Without a sweep it is `clients`: the K sampled clients of a round are
split across the devices (`place_round` runs the round's client phase under `jax.shard_map`),
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

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from softjax.data.layout import ClientMajorLayout, gather_rows
from softjax.federated import round as round_lib
from softjax.federated import types as fl_types

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
  the global model, the server optimizer's state, SCAFFOLD's server control, FedEx-LoRA's
  folds and the round counter replicated; the [N, ...] residuals, client controls and
  FedSA-LoRA's client B split along N (replicated when N does not divide evenly)."""
  rep = replicated(mesh)
  per_client = lambda tree: jax.tree.map(  # noqa: E731
      lambda x: leading_sharding(mesh, x.shape[0]), tree)
  return state._replace(
      trainable=jax.tree.map(lambda _: rep, state.trainable), round=rep,
      server_opt=jax.tree.map(lambda _: rep, state.server_opt),
      control=jax.tree.map(lambda _: rep, state.control),
      residuals=per_client(state.residuals), client_controls=per_client(state.client_controls),
      client_factors=per_client(state.client_factors),
      folded=jax.tree.map(lambda _: rep, state.folded))


def place_state(state: PyTree, mesh: Mesh, stacked: bool) -> PyTree:
  """A federated.ServerState on the mesh: `state_shardings`, or for a sweep's stacked [S, ...]
  state every leaf split along the members axis."""
  return place(state, along_axis(mesh) if stacked else state_shardings(state, mesh))


def place_round(phases: round_lib.RoundPhases, mesh: Mesh | None, shard_data: bool = False):
  """The round of `phases` over a 1-D `clients` mesh (None: one device, `round.assemble`).

  round_fn(state, frozen, data, client_ids [K], root_key, hparams) -> (state, metrics [K]):
  - the K client slots are padded to a multiple of the devices; padding slots repeat the first
    client, weigh nothing, write nothing back and report zeros, and the metrics keep the K
    real slots;
  - the client phase runs under `jax.shard_map`, each device training its share of the slots;
    the frozen backbone, the data and the global factors are replicated into it, and the
    aggregation over the client-sharded uploads is left to the compiler (an all-reduce);
  - shard_data: the training set is sharded over the mesh, and each round gathers the sampled
    clients' examples to the devices that train them instead of replicating the set.

  Jit the result with `round_out_shardings` so the state keeps its layout between rounds.
  """
  if mesh is None:
    return round_lib.assemble(phases)
  axis = mesh.axis_names[0]

  def runner(run_clients):
    def marked(glob, *rest):
      # The global model enters every device unchanged (replicated); marking it varying over
      # the clients axis makes each device's gradients its own. Unmarked, the transpose of the
      # implicit broadcast sums every device's client gradients together (docs/design.md).
      return run_clients(jax.lax.pcast(glob, axis, to="varying"), *rest)

    shared, split = P(), P(axis)
    sharded = jax.shard_map(marked, mesh=mesh,
                            in_specs=(shared, shared, shared, shared, split, split, split, split),
                            out_specs=split)

    def run(glob, frozen, data, scalars, ids, keys, per_client):
      if shard_data:
        # Move each sampled client's examples to the device that trains it (the compiler
        # inserts the collective), not the whole set.
        return sharded(glob, frozen, None, scalars, ids, keys, per_client,
                       round_lib.slot_examples(data, ids))
      return sharded(glob, frozen, data, scalars, ids, keys, per_client, None)
    return run

  padded = round_lib.assemble(phases, runner)

  def round_fn(state, frozen, data, client_ids, root_key, hparams):
    k = client_ids.shape[0]
    pad = padded_count(k, mesh) - k
    ids = jnp.concatenate([client_ids, jnp.full((pad,), client_ids[0], client_ids.dtype)])
    valid = (jnp.arange(k + pad) < k).astype(jnp.float32)
    if hparams.uplink is not None:
      hparams = hparams._replace(uplink=jax.tree.map(
          lambda x: jnp.concatenate([x, jnp.zeros((pad,), x.dtype)]), hparams.uplink))
    state, metrics = padded(state, frozen, data, ids, root_key, hparams, valid)
    per_slot = ("client_loss", "client_bits", "client_latency_s")
    return state, metrics._replace(**{f: getattr(metrics, f)[:k] for f in per_slot})

  return round_fn


def round_out_shardings(state: fl_types.ServerState, mesh: Mesh):
  """out_shardings of a jitted clients-mesh round: the state as `state_shardings`, the metrics
  replicated (every process reads them). Pinning them keeps the next round's inputs in the
  same layout, so nothing recompiles."""
  return state_shardings(state, mesh), replicated(mesh)
