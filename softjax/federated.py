"""The federated round: local LoRA training on every sampled client, then server aggregation.

One call of the jitted round function runs a whole round on the device:
  per client k in S_t: lax.scan over E local steps (batches gathered on the device) -> update
  clients: lax.map(..., batch_size=client_parallelism)  (1 = sequential in-graph, K = full vmap),
           under jax.shard_map over a `clients` device mesh when one is given (softjax/mesh.py)
           -> the method's upload (sparsifiers.py: dense, SOFT, TLoRA, RLoRA, SLoRA) with
              error-feedback residuals gathered from and written back to all N clients
  server:  the method's aggregation; for factor uploads
           B^{t+1} = B^t + sum_k p_k * sent_k, p_k = n_k / sum_{j in S_t} n_j, leaf by leaf,
           so B and A are averaged separately (ALGORITHM.md section 3); head: dense FedAvg.

Leading-axis conventions: `[K, ...]` sampled clients, `[N, ...]` all clients.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, PartitionSpec as P

from softjax import mesh as mesh_lib
from softjax import soft
from softjax import sparsifiers
from softjax import wireless
from softjax.data import batching

PyTree = Any
# apply_fn(frozen_params, trainable, images float32 [B, H, W, C]) -> logits [B, classes]
ApplyFn = Callable[[PyTree, PyTree, jax.Array], jax.Array]

HOST_STREAM_SAMPLING = 0  # host rng stream ids: np.random.default_rng([seed, stream, round])


class Trainable(NamedTuple):
  """What clients train and upload: LoRA factors and the classifier head."""
  lora: PyTree
  head: PyTree


class ServerState(NamedTuple):
  """The global model between rounds, and what clients keep between rounds."""
  trainable: Trainable
  round: jax.Array  # int32 [], rounds completed
  residuals: PyTree  # error-feedback residuals, LoRA structure with a leading [N] axis; {} if off


class FederatedData(NamedTuple):
  """Device-resident federated training set with per-client padded index tables."""
  images: jax.Array  # uint8 [M, H, W, C]
  labels: jax.Array  # int32 [M]
  table: jax.Array  # int32 [N, max_n], padded; row k lists client k's examples
  counts: jax.Array  # int32 [N], valid entries per row


class Uplink(NamedTuple):
  """The sampled clients' links this round, as the controller chose them (ALGORITHM.md 4, 6)."""
  bandwidth_hz: jax.Array  # float32 [K], FDMA share b_k
  snr_coeff: jax.Array  # float32 [K], a_k = p beta_k g_k / N0 in Hz
  compute_s: jax.Array  # float32 [K], local training time c_k
  received: jax.Array  # float32 [K], 1 = the upload arrives, 0 = lost mid-round (E6 dropouts)


class RoundHparams(NamedTuple):
  """Per-round hyperparameters passed as traced arrays, so new values never recompile."""
  client_lr: jax.Array  # float32 []
  zeta: jax.Array  # float32 [], orthogonality penalty weight (ALGORITHM.md 2.1)
  keep_ratio: jax.Array  # float32 [], O_t in (0, 1] (ALGORITHM.md 2.3)
  uplink: Uplink | None = None  # None: latency is not simulated (reported as 0)


def make_hparams(client_lr: float, zeta: float = 0.0, keep_ratio: float = 1.0,
                 uplink: tuple | None = None) -> RoundHparams:
  """RoundHparams from host values; `uplink` is (bandwidth_hz, snr_coeff, compute_s[,
  received]), each [K] (received defaults to all ones)."""
  if uplink is not None:
    uplink = tuple(uplink) + ((np.ones(np.shape(uplink[0])),) if len(uplink) == 3 else ())
    uplink = Uplink(*(jnp.asarray(x, jnp.float32) for x in uplink))
  return RoundHparams(client_lr=jnp.float32(client_lr), zeta=jnp.float32(zeta),
                      keep_ratio=jnp.float32(keep_ratio), uplink=uplink)


class RoundMetrics(NamedTuple):
  train_loss: jax.Array  # float32 [], data-weighted mean over sampled clients (lost uploads too)
  client_loss: jax.Array  # float32 [K], mean local loss per sampled client
  client_bits: jax.Array  # int32 [K], uplink bits per sampled client (ALGORITHM.md 2.5)
  client_latency_s: jax.Array  # float32 [K], c_k + bits_k / R_k(b_k); 0 without an uplink
  dropped_energy: jax.Array  # float32 [], summed over clients and layers
  cov_term: jax.Array  # float32 [], sum over layers of ||sum p_k B_k A_k - Bbar Abar||_F
  orth_residual: jax.Array  # float32 [2], mean over layers for B^T B and A A^T (global factors)


def init_state(lora: PyTree, head: PyTree, num_clients: int, error_feedback: bool
               ) -> ServerState:
  """Round 0: the initial global factors and head, zero residuals for all N clients."""
  residuals = (jax.tree.map(lambda x: jnp.zeros((num_clients,) + x.shape, x.dtype), lora)
               if error_feedback else {})
  return ServerState(trainable=Trainable(lora=lora, head=head),
                     round=jnp.zeros((), jnp.int32), residuals=residuals)


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


def make_client_optimizer(name: str, learning_rate: jax.Array) -> optax.GradientTransformation:
  """The local optimizer; built inside the trace so the learning rate can be a traced array."""
  if name == "sgd":
    return optax.sgd(learning_rate)
  if name == "momentum":
    return optax.sgd(learning_rate, momentum=0.9)
  if name == "adam":
    return optax.adam(learning_rate)
  raise ValueError(f"unknown client optimizer {name!r}")


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_client_update(apply_fn: ApplyFn, *, optimizer: str, local_steps: int, batch_size: int,
                       penalty: str = "offdiag"):
  """Returns client_update(trainable, frozen, data, client_id, key, hparams) -> (local, loss).

  The client starts from the global `trainable`, takes `local_steps` optimizer steps on
  batches of its own data with the objective F_k + zeta * R (ALGORITHM.md 2.1), and returns
  its trained `trainable` and its mean training loss F_k. Only `trainable` is differentiated.
  """

  def client_update(trainable: Trainable, frozen: PyTree, data: FederatedData,
                    client_id: jax.Array, key: jax.Array, hparams: RoundHparams):
    tx = make_client_optimizer(optimizer, hparams.client_lr)
    count = data.counts[client_id]
    row = data.table[client_id]
    order = batching.client_permutation(key, count, data.table.shape[1])

    def loss_fn(params, x, y):
      loss = cross_entropy(apply_fn(frozen, params, x), y)
      reg = soft.orthogonality_penalty(params.lora, kind=penalty)
      return loss + hparams.zeta * reg, loss

    def step(carry, s):
      params, opt_state = carry
      positions = batching.batch_positions(order, count, s, batch_size)
      x, y = batching.gather_batch(data.images, data.labels, row, positions)
      (_, loss), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, y)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    (local, _), losses = jax.lax.scan(step, (trainable, tx.init(trainable)),
                                      jnp.arange(local_steps))
    return local, losses.mean()

  return client_update


def aggregation_weights(counts: jax.Array) -> jax.Array:
  """p_k = n_k / sum_{j in S_t} n_j (ALGORITHM.md section 3). counts: [K] -> [K]; all zeros
  (every upload lost) gives zero weights, so the global model stays as it is."""
  counts = counts.astype(jnp.float32)
  total = counts.sum()
  return counts / jnp.where(total > 0, total, 1.0)


def covariance_diagnostic(global_lora: PyTree, sent: PyTree, weights: jax.Array) -> jax.Array:
  """Sum over layers of the covariance term of separate B/A averaging (ALGORITHM.md 3), for
  the factors the server received, B_k = B^t + sent_k (r x r Gram matrices only)."""
  received = jax.tree.map(lambda g, s: g[None] + s, global_lora, sent)
  terms = soft.covariance_terms(received, weights)
  return jnp.sum(terms) if terms.size else jnp.zeros((), jnp.float32)


def global_orth_residual(lora: PyTree) -> jax.Array:
  rb, ra = soft.orthogonality_residuals(lora)
  if rb.size == 0:
    return jnp.zeros((2,), jnp.float32)
  return jnp.stack([rb.mean(), ra.mean()])


def make_round(apply_fn: ApplyFn, *, optimizer: str, local_steps: int, batch_size: int,
               client_parallelism: int, sparsifier: sparsifiers.Sparsifier | None = None,
               penalty: str = "offdiag", value_bits: int = 32, head_params: int = 0,
               mesh: Mesh | None = None, shard_data: bool = False):
  """Builds round_fn(state, frozen, data, client_ids [K], root_key, hparams) -> (state, metrics).

  Args:
    apply_fn: the model, apply_fn(frozen, trainable, images) -> logits.
    optimizer: client optimizer name (sgd, momentum, adam).
    local_steps: E.
    batch_size: b.
    client_parallelism: lax.map batch size over the K sampled clients.
    sparsifier: the upload method (default: dense).
    penalty: orthogonality penalty kind (soft.PENALTY_KINDS).
    value_bits: q, bits per uploaded value.
    head_params: values in the head, sent densely by every client.
    mesh: a 1-D mesh over the `clients` axis (softjax/mesh.py), or None for one device. The
      client slots (K rounded up to a multiple of the devices; extra slots weigh nothing) are
      split across the devices by `jax.shard_map`; the frozen backbone, the data and the
      global factors are replicated into it; the aggregation over the client-sharded uploads
      is left to the compiler (an all-reduce).
    shard_data: the training set is sharded over the mesh (mesh.shard_data): each round
      gathers the sampled clients' examples to the devices that train them instead of
      replicating the set into the client map. Needs a mesh.

  The result is not jitted, so callers can wrap it (jit with donation, vmap over a sweep
  axis, ...).
  """
  client_update = make_client_update(apply_fn, optimizer=optimizer, local_steps=local_steps,
                                     batch_size=batch_size, penalty=penalty)
  method = sparsifier or sparsifiers.make_sparsifier("dense")

  def run_clients(glob, frozen, data, hparams, client_ids, keys, residuals, slot_data):
    """Trains and compresses the given client slots: [C] ids -> [C] uploads, deltas, losses.

    slot_data None: every client reads its batches from the shared `data`. Otherwise it holds
    each slot's own examples ([C, max_n, ...], a one-row table) and `data` is not read.
    """

    def one_client(args):
      client_id, key, residual, own = args
      source = data if own is None else own
      local, loss = client_update(glob, frozen, source, client_id if own is None else 0, key,
                                  hparams)
      if residual is None:
        residual = jax.tree.map(jnp.zeros_like, glob.lora)
      # The mask key (RLoRA) is a pure function of (seed, round, client): the server can
      # regenerate it, so it costs no index bits.
      upload = method.compress(glob.lora, local.lora, residual, hparams.keep_ratio,
                               jax.random.fold_in(key, 1))
      return upload, optax.tree.sub(local.head, glob.head), loss

    return jax.lax.map(one_client, (client_ids, keys, residuals, slot_data),
                       batch_size=client_parallelism)

  if mesh is not None:
    # Every device trains its share of the slots; what the clients read is replicated.
    shared, split = P(), P(mesh.axis_names[0])
    run_clients = jax.shard_map(
        run_clients, mesh=mesh,
        in_specs=(shared, shared, shared, shared, split, split, split, split),
        out_specs=split,
        # With the replication checker on, jax 0.10.2 computed different client updates
        # than the unsharded round (the losses of the same clients and keys differed); off,
        # they agree to float precision (tests/test_mesh.py).
        check_vma=False)

  def round_fn(state: ServerState, frozen: PyTree, data: FederatedData,
               client_ids: jax.Array, root_key: jax.Array, hparams: RoundHparams):
    chex.assert_rank(client_ids, 1)
    k = client_ids.shape[0]
    glob = state.trainable
    round_key = jax.random.fold_in(root_key, state.round)
    # Pad-and-mask: extra slots repeat the first client, weigh nothing and write nothing back.
    slots = mesh_lib.padded_count(k, mesh)
    valid = (jnp.arange(slots) < k).astype(jnp.float32)
    ids = jnp.concatenate([client_ids, jnp.full((slots - k,), client_ids[0], client_ids.dtype)])
    # Keys follow the client id, not its slot in S_t, so a client's data order does not
    # depend on which other clients were sampled with it.
    keys = jax.vmap(lambda c: jax.random.fold_in(round_key, c))(ids)
    residuals = (jax.tree.map(lambda r: r[ids], state.residuals)
                 if method.error_feedback else None)
    scalars = hparams._replace(uplink=None)  # what a client reads; the links are [K]
    slot_data = None
    if shard_data:
      # The training set is sharded over the devices: move each sampled client's examples to
      # the device that trains it (the compiler inserts the collective), not the whole set.
      slot_data = slot_examples(data, ids)
      data = None
    uploads, head_deltas, losses = run_clients(glob, frozen, data, scalars, ids, keys, residuals,
                                               slot_data)
    data_counts = slot_data.counts[:, 0] if shard_data else data.counts[ids]
    received = (jnp.ones((k,), jnp.float32) if hparams.uplink is None
                else hparams.uplink.received)
    received = jnp.concatenate([received, jnp.zeros((slots - k,), jnp.float32)])
    # A lost upload (E6 dropout) weighs nothing; the others are renormalized among themselves.
    weights = aggregation_weights(data_counts * received)
    lora = method.aggregate(glob.lora, uploads.sent, uploads.support, weights)
    head = optax.tree.add(glob.head, sparsifiers.weighted_sum(head_deltas, weights))
    new_residuals = state.residuals
    if method.error_feedback:
      # A client whose upload was lost keeps all of U (what it sent, and what it held back).
      kept = jax.tree.map(lambda r, s: r + _per_client(1.0 - received, s) * s,
                          uploads.residual, uploads.sent)
      # Padding slots point past the end, so their write is dropped.
      write_ids = jnp.where(valid > 0, ids, _num_rows(state))
      new_residuals = jax.tree.map(
          lambda all_r, r: all_r.at[write_ids].set(r, mode="drop"), state.residuals, kept)
    bits = (value_bits * (uploads.values + head_params) + uploads.index_bits)[:k]
    received = received[:k]
    if hparams.uplink is None:
      latency = jnp.zeros(bits.shape, jnp.float32)
    else:
      # The server waits for the uploads that arrive; a lost one does not hold the round
      # (a where, not a product: a lost upload over a dead link must give 0, not 0 * inf = NaN).
      link = hparams.uplink
      latency = jnp.where(received > 0, wireless.client_latencies_s(
          bits, link.bandwidth_hz, link.snr_coeff, link.compute_s, xp=jnp), 0.0)
      bits = (bits * received).astype(bits.dtype)  # delivered bits
    cov = (covariance_diagnostic(glob.lora, uploads.sent, weights) if method.factor_upload
           else jnp.zeros((), jnp.float32))
    # Every sampled client trained, whether or not its upload arrived, so the reported loss
    # weighs them all by data size (a round whose uploads were all lost still has a loss).
    train_loss = jnp.dot(aggregation_weights(data_counts * valid), losses)
    metrics = RoundMetrics(train_loss=train_loss, client_loss=losses[:k],
                           client_bits=bits, client_latency_s=latency,
                           dropped_energy=(valid * uploads.dropped_energy).sum(), cov_term=cov,
                           orth_residual=global_orth_residual(lora))
    new_state = ServerState(trainable=Trainable(lora=lora, head=head), round=state.round + 1,
                            residuals=new_residuals)
    if mesh is not None:
      new_state, metrics = _constrain(new_state, metrics, mesh)
    return new_state, metrics

  return round_fn


def slot_examples(data: FederatedData, ids: jax.Array) -> FederatedData:
  """Each slot's own examples as a one-client data set: [C, max_n, ...] images and labels, a
  [C, 1, max_n] identity table and [C, 1] counts. Batches drawn from it equal those drawn from
  `data` for the same client and key."""
  rows = data.table[ids]
  width = data.table.shape[1]
  table = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (ids.shape[0], 1, width))
  return FederatedData(images=data.images[rows], labels=data.labels[rows], table=table,
                       counts=data.counts[ids][:, None])


def _num_rows(state: ServerState) -> int:
  """N, the clients the residual store holds (static)."""
  return jax.tree.leaves(state.residuals)[0].shape[0]


def _constrain(state: ServerState, metrics: RoundMetrics, mesh: Mesh):
  """Pins the round's outputs to the layout its inputs had (mesh.state_shardings; the metrics
  replicated, every process reads them), so the next round sees the same shardings and nothing
  recompiles."""
  pin = lambda tree, shardings: jax.tree.map(  # noqa: E731
      jax.lax.with_sharding_constraint, tree, shardings)
  rep = mesh_lib.replicated(mesh)
  return (pin(state, mesh_lib.state_shardings(state, mesh)),
          pin(metrics, jax.tree.map(lambda _: rep, metrics)))


def _per_client(values: jax.Array, like: jax.Array) -> jax.Array:
  """[K] values shaped to broadcast against a [K, ...] array."""
  return values.reshape(values.shape + (1,) * (like.ndim - 1))


def make_eval(apply_fn: ApplyFn, batch_size: int):
  """Builds eval_fn(frozen, trainable, images, labels, mask) -> (correct, count).

  images/labels/mask are padded to a multiple of batch_size ([nb * bs, ...]); padded rows
  have mask 0 and are not counted.
  """

  def eval_fn(frozen, trainable, images, labels, mask):
    shape = (-1, batch_size)

    def one_batch(args):
      x, y, m = args
      logits = apply_fn(frozen, trainable, batching.preprocess(x))
      return jnp.sum((jnp.argmax(logits, -1) == y) * m), jnp.sum(m)

    batches = (images.reshape(shape + images.shape[1:]), labels.reshape(shape),
               mask.reshape(shape))
    correct, count = jax.lax.map(one_batch, batches)
    return correct.sum(), count.sum()

  return eval_fn
