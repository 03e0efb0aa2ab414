"""The federated round: local LoRA training on every sampled client, then server aggregation.

One call of the jitted round function runs a whole round on the device, in three phases:
  clients: per client slot, lax.scan over E local steps (batches gathered on the device), then
           the method's upload (sparsify/sparsifier.py: dense, SOFT, TLoRA, RLoRA, SLoRA) with
           its error-feedback residual; the slots run through
           lax.map(..., batch_size=client_parallelism) (1 = sequential in-graph, all = vmap)
  server:  the method's aggregation; for factor uploads
           B^{t+1} = B^t + sum_k p_k * sent_k, p_k = n_k / sum_{j in S_t} n_j, leaf by leaf,
           so B and A are averaged separately (ALGORITHM.md section 3); head: dense FedAvg;
           residuals written back to the N-client store
  metrics: bits, latency over the chosen links, loss and the diagnostics

The round does not know where it runs. `make_round` assembles the phases for one device;
`federated/placement.place_round` assembles the same phases over a device mesh (client slots
split across devices, padding slots, sharded data) without changing them.

Leading-axis conventions: `[K, ...]` sampled clients, `[C, ...]` client slots (K, or K padded
to a multiple of the devices), `[N, ...]` all clients.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import chex
import jax
import jax.numpy as jnp
import optax

from softjax.federated.aggregation import (
  aggregation_weights,
  client_score_diagnostics,
  covariance_diagnostic,
  global_orth_residual,
)
from softjax.federated import lora_rules
from softjax.federated import server_opt as server_opt_lib
from softjax.federated.client import make_client_update
from softjax.federated.types import (
  ApplyFn,
  FederatedData,
  PyTree,
  RoundHparams,
  RoundMetrics,
  ServerState,
  Trainable,
)
from softjax.models import lora as lora_lib
from softjax.sparsify import reorthogonalize as reorth
from softjax.sparsify import sparsifier as sparsifiers
from softjax.wireless import link as link_lib

# run_clients(glob, frozen, data, scalars, ids [C], keys [C], per_client, slot_data [C] | None)
#   -> (uploads [C], head deltas [C], losses [C], SCAFFOLD controls c_k+ [C] | None);
# per_client = (error-feedback residuals [C] | None, SCAFFOLD corrections c - c_k [C] | None,
#               FedSA-LoRA's own B [C] | None).
ClientsFn = Callable[..., tuple]
# A runner wraps ClientsFn into (glob, frozen, data, scalars, ids, keys, per_client) -> same:
# where the slots run (one device, or split over a mesh) and where their examples come from.
ClientsRunner = Callable[[ClientsFn], Callable[..., tuple]]


@dataclasses.dataclass(frozen=True)
class RoundPhases:
  """The three phases of a round; placement decides where `clients` runs."""
  clients: ClientsFn
  server: Callable  # (state, glob, uploads, head_deltas, ids, valid, received, data_counts,
  #                   new_controls, round_key)
  metrics: Callable  # (glob, lora, uploads, losses, valid, received, weights, data_counts, link)
  error_feedback: bool
  scaffold: bool = False
  rule: str = "fedit"  # the federated-LoRA aggregation rule (federated/lora_rules.py)
  # The per-client stores in the state hold only this round's slots, gathered on the host
  # (federated/client_store.py); row j is slot j, not client id j.
  host_store: bool = False
  personal_b: bool = False  # FedSA-LoRA: every client trains from and keeps its own B
  adapter_scale: float = 1.0  # alpha / r, the scale of FedEx-LoRA's folds in the frozen kernels


def make_phases(apply_fn: ApplyFn, *, optimizer: str, local_steps: int, batch_size: int,
                client_parallelism: int, sparsifier: sparsifiers.Sparsifier | None = None,
                penalty: str = "offdiag", value_bits: int = 32, head_params: int = 0,
                reorthogonalize: bool = False,
                server_optimizer: optax.GradientTransformation | None = None,
                prox_mu: float = 0.0, scaffold: bool = False,
                rule: str = "fedit", host_store: bool = False,
                num_clients: int = 0, adapter_scale: float = 1.0,
                client_ranks: tuple[int, ...] = ()) -> RoundPhases:
  """The phases of a round of `sparsifier` (default dense) over `apply_fn`.

  Args:
    apply_fn: the model, apply_fn(frozen, trainable, images) -> logits.
    optimizer: client optimizer name (sgd, momentum, adam).
    local_steps: E.
    batch_size: b.
    client_parallelism: lax.map batch size over the client slots (on each device).
    sparsifier: the upload method (default: dense).
    penalty: orthogonality penalty kind (soft.PENALTY_KINDS).
    value_bits: q, bits per uploaded value.
    head_params: values in the head, sent densely by every client.
    reorthogonalize: re-orthogonalize the global factors after each aggregation, product kept
      (ALGORITHM.md 2.1), with every residual moved into the new basis; factor uploads only.
    server_optimizer: a FedOpt step on the aggregate (federated/server_opt.py); None: FedAvg.
      Its state must be in the ServerState (`init_state(..., server_opt=tx.init(trainable))`).
    prox_mu: FedProx's proximal weight on the clients (0: off).
    scaffold: SCAFFOLD's control variates (client SGD only); the state must hold them
      (`init_state(..., scaffold=True)`), and each client also uploads its control delta.
    rule: the federated-LoRA aggregation rule (lora_rules: fedit, ffa, fedsa, fedex, flora,
      rolora, fedsvd, flexlora, hetlora): which factors clients train each round and how the
      server re-forms them; other than fedit, dense uploads only. fedsa needs the state's
      client_factors (`init_state(..., personal_b=True)`), fedex and flora their folds
      (`init_state(..., fold=True)`), hetlora `client_ranks`.
    host_store: the state's residuals and client controls are the K sampled clients' rows,
      gathered by the host (federated/client_store.py), not all N clients'; with
      `reorthogonalize` the metrics carry the round's change of basis, for the rows left on
      the host.
    num_clients: N, which SCAFFOLD's server control averages over; 0: the store's rows (N
      unless `host_store`).
    adapter_scale: the LoRA scale alpha / r, with which FedEx-LoRA's folds enter the frozen
      kernels (models/lora.fold_into).
    client_ranks: HetLoRA's ranks, dealt to clients by id (lora_rules.client_rank_keep), each
      at most the LoRA rank r_max.
  """
  client_update = make_client_update(apply_fn, optimizer=optimizer, local_steps=local_steps,
                                     batch_size=batch_size, penalty=penalty, prox_mu=prox_mu)
  method = sparsifier or sparsifiers.make_sparsifier("dense")
  if reorthogonalize and not method.factor_upload:
    raise ValueError(f"reorthogonalize needs factor uploads; {method.name} sends products")
  if reorthogonalize and (server_optimizer is not None or scaffold):
    # Moments and control variates live in the factors' old basis.
    raise ValueError("reorthogonalize cannot run with a server optimizer or SCAFFOLD")
  if host_store and scaffold and not num_clients:
    raise ValueError("SCAFFOLD with a host store needs num_clients (N)")
  if scaffold and optimizer != "sgd":
    raise ValueError(f"SCAFFOLD's control update assumes client SGD, not {optimizer}")
  if rule != "fedit" and (method.name != "dense" or reorthogonalize or scaffold):
    raise ValueError(f"aggregation rule {rule} runs with dense uploads only, without "
                     "re-orthogonalization or SCAFFOLD")
  if rule in ("fedsvd", "flexlora", "fedsa", "fedex", "flora") and server_optimizer is not None:
    raise ValueError(f"aggregation rule {rule} re-factorizes; a server optimizer's moments "
                     "would not follow")
  if bool(client_ranks) != (rule == "hetlora"):
    raise ValueError(f"client_ranks {client_ranks} go with rule hetlora only (rule is {rule})")

  def clients(glob, frozen, data, hparams, client_ids, keys, per_client, slot_data):
    """Trains and compresses the given client slots: [C] ids -> [C] uploads, deltas, losses
    and (SCAFFOLD) the clients' new control variates.

    slot_data None: every client reads its batches from the shared `data`. Otherwise it holds
    each slot's own examples ([C, max_n, ...], a one-row table) and `data` is not read.
    """

    def one_client(args):
      client_id, key, (residual, correction, own_b), own = args
      source = data if own is None else own
      # FedSA-LoRA: the client starts from the shared A and its own B; its upload is the change
      # from there.
      start = glob if own_b is None else glob._replace(
          lora=lora_lib.with_b_factors(glob.lora, own_b))
      client_hparams, reference = hparams, start.lora
      if client_ranks:
        # HetLoRA: the client trains the global factors truncated to its rank r_k; the server
        # zero-pads what it sends, so its upload is measured from the untruncated global factors
        # (only r_k components' values are sent and billed).
        keep = lora_rules.client_rank_keep(client_ranks, client_id, _rank(glob.lora))
        start = start._replace(lora=lora_rules.truncated(start.lora, keep))
        client_hparams = hparams._replace(factor_mask=jnp.stack([keep, keep]))
        reference = glob.lora
      local, loss = client_update(start, frozen, source, client_id if own is None else 0, key,
                                  client_hparams, correction)
      control = None
      if scaffold:
        # Option II of SCAFFOLD: c_k+ = c_k - c + (x - y_k) / (E lr) = (x - y_k) / (E lr) - corr.
        steps_lr = local_steps * hparams.client_lr
        control = jax.tree.map(lambda x, y, d: (x - y) / steps_lr - d, glob, local, correction)
      if residual is None:
        residual = jax.tree.map(jnp.zeros_like, glob.lora)
      # The mask key (RLoRA) is a pure function of (seed, round, client): the server can
      # regenerate it, so it costs no index bits.
      upload = method.compress(reference, local.lora, residual, hparams.keep_ratio,
                               jax.random.fold_in(key, 1))
      kept_home = client_hparams.factor_mask
      if own_b is not None:  # B never leaves the client: only A's values are sent
        kept_home = jnp.array([0.0, 1.0])
      if kept_home is not None:  # a frozen (or personal) factor is not uploaded
        upload = upload._replace(values=upload.values - _frozen_values(glob.lora, kept_home))
      return upload, optax.tree.sub(local.head, glob.head), loss, control

    return jax.lax.map(one_client, (client_ids, keys, per_client, slot_data),
                       batch_size=client_parallelism)

  return RoundPhases(clients=clients,
                     server=_server_phase(method, reorthogonalize, server_optimizer, scaffold,
                                          rule, num_clients, personal_b=rule == "fedsa"),
                     metrics=_metrics_phase(method, value_bits, head_params, scaffold, rule),
                     error_feedback=method.error_feedback, scaffold=scaffold, rule=rule,
                     host_store=host_store, personal_b=rule == "fedsa",
                     adapter_scale=adapter_scale)


def _frozen_values(lora: PyTree, mask: jax.Array) -> jax.Array:
  """LoRA values a client does not send (int32): B's columns where mask[0] = 0 and A's rows
  where mask[1] = 0; `mask` is [2] (whole factors) or [2, r] (per rank component)."""
  pairs, _ = lora_lib.factor_pairs(lora)
  unsent = 1.0 - jnp.broadcast_to(jnp.reshape(mask, (2, -1)), (2, _rank(lora))).mean(axis=1)
  b_values = sum(p["B"].size for p in pairs)
  a_values = sum(p["A"].size for p in pairs)
  return jnp.round(unsent[0] * b_values + unsent[1] * a_values).astype(jnp.int32)


# FLoRA's restart key is fold_in(round key, RESTART_STREAM): a value no client id reaches, so it
# never equals a client's key of the same round.
RESTART_STREAM = 2**31 - 1


def _server_phase(method: sparsifiers.Sparsifier, reorthogonalize: bool = False,
                  server_optimizer: optax.GradientTransformation | None = None,
                  scaffold: bool = False, rule: str = "fedit", num_clients: int = 0,
                  personal_b: bool = False):
  """The server phase of `method`: aggregation, the server optimizer's step on it, the
  residual store (ALGORITHM.md 2.4, 3) and SCAFFOLD's control variates."""

  def server(state, glob, uploads, head_deltas, rows, valid, received, data_counts,
             new_controls=None, round_key=None):
    """The next global factors, head and residual store; the aggregation weights; and the
    re-orthogonalization's bases (() without it). `rows` [C] index the per-client stores;
    `round_key` seeds FLoRA's restarted adapter."""
    # A lost upload (E6 dropout) weighs nothing; the others are renormalized among themselves.
    weights = aggregation_weights(data_counts * received)
    lora = method.aggregate(glob.lora, uploads.sent, uploads.support, weights)
    lora = lora_rules.server_update(rule, glob.lora, uploads.sent, weights, lora)
    client_factors, folded = state.client_factors, state.folded
    if rule == "flora":  # the adapter restarts from a key every client can draw too
      lora = lora_rules.restarted(lora, jax.random.fold_in(round_key, RESTART_STREAM))
    if rule in lora_rules.FOLDING_RULES:
      folded = lora_rules.fold_update(rule, glob.lora, uploads.sent, weights, lora, folded)
    if personal_b:
      lora, client_factors = _personal_b(state, glob.lora, lora, uploads.sent, rows, valid,
                                         num_clients)
    head = optax.tree.add(glob.head, sparsifiers.weighted_sum(head_deltas, weights))
    trainable, opt_state = Trainable(lora=lora, head=head), state.server_opt
    if server_optimizer is not None:
      trainable, opt_state = server_opt_lib.step(server_optimizer, glob, trainable, opt_state)
    residuals = state.residuals
    if method.error_feedback:
      # A client whose upload was lost keeps all of U (what it sent, and what it held back).
      kept = jax.tree.map(lambda r, s: r + _per_client(1.0 - received, s) * s,
                          uploads.residual, uploads.sent)
      # Padding slots point past the end, so their write is dropped.
      write_ids = jnp.where(valid > 0, rows, _num_rows(state))
      residuals = jax.tree.map(
          lambda all_r, r: all_r.at[write_ids].set(r, mode="drop"), state.residuals, kept)
    control, client_controls = state.control, state.client_controls
    if scaffold:
      control, client_controls = _scaffold_controls(state, rows, valid * received, new_controls,
                                                    num_clients)
    bases = ()
    if reorthogonalize:
      # Every stored residual is in the old basis, the sampled clients' just written included.
      lora, bases = reorth.reorthogonalize(trainable.lora)
      trainable = trainable._replace(lora=lora)
      if method.error_feedback:
        residuals = reorth.change_basis(residuals, bases)
    new_state = ServerState(trainable=trainable, round=state.round + 1, residuals=residuals,
                            server_opt=opt_state, control=control,
                            client_controls=client_controls, client_factors=client_factors,
                            folded=folded)
    return new_state, weights, bases

  return server


def _personal_b(state: ServerState, glob_lora, lora, sent, rows, valid, num_clients: int = 0):
  """FedSA-LoRA's B side: each trained client keeps B_k + dB_k (whether or not its upload of A
  arrived: B never leaves it), and the global B stays the mean of all N clients' B,
  Bbar <- Bbar + (1/N) sum_{k in S} dB_k. Returns (lora with that B, the new store)."""
  stored = _num_rows(state, state.client_factors)
  n = num_clients or stored
  delta = jax.tree.map(lambda d: _per_client(valid, d) * d, lora_lib.b_factors(sent))
  old = jax.tree.map(lambda all_b: all_b[rows], state.client_factors)
  write_ids = jnp.where(valid > 0, rows, stored)  # padding slots write nothing
  client_factors = jax.tree.map(lambda all_b, o, d: all_b.at[write_ids].set(o + d, mode="drop"),
                                state.client_factors, old, delta)
  mean_b = jax.tree.map(lambda g, d: g + d.sum(axis=0) / n, lora_lib.b_factors(glob_lora), delta)
  return lora_lib.with_b_factors(lora, mean_b), client_factors


def _scaffold_controls(state: ServerState, rows, arrived, new_controls, num_clients: int = 0):
  """SCAFFOLD's server side: c <- c + (1/N) sum_{k in S} (c_k+ - c_k) over the uploads that
  arrived, which also store their c_k+; [choice] a client whose upload was lost keeps its old
  c_k, so that c stays the mean of the stored c_k. `rows` index the store of c_k."""
  n = num_clients or _num_rows(state, state.client_controls)
  stored = _num_rows(state, state.client_controls)
  old = jax.tree.map(lambda all_c: all_c[rows], state.client_controls)
  delta = jax.tree.map(lambda new, o: _per_client(arrived, new) * (new - o), new_controls, old)
  control = jax.tree.map(lambda c, d: c + d.sum(axis=0) / n, state.control, delta)
  write_ids = jnp.where(arrived > 0, rows, stored)  # the others are dropped
  client_controls = jax.tree.map(lambda all_c, new: all_c.at[write_ids].set(new, mode="drop"),
                                 state.client_controls, new_controls)
  return control, client_controls


def _metrics_phase(method: sparsifiers.Sparsifier, value_bits: int, head_params: int,
                   scaffold: bool = False, rule: str = "fedit"):
  """The metrics phase: delivered bits (ALGORITHM.md 2.5), latency (4), loss, diagnostics (3)."""

  def metrics(glob, lora, uploads, losses, valid, received, weights, data_counts, link):
    """RoundMetrics over the C slots (padding slots report zeros)."""
    # SCAFFOLD also uploads its control delta, dense: one value per trained value.
    extra = sum(x.size for x in jax.tree.leaves(glob)) if scaffold else 0
    bits = value_bits * (uploads.values + head_params + extra) + uploads.index_bits
    if link is None:
      latency = jnp.zeros(bits.shape, jnp.float32)
    else:
      # The server waits for the uploads that arrive; a lost one does not hold the round
      # (a where, not a product: a lost upload over a dead link must give 0, not 0 * inf = NaN).
      latency = jnp.where(received > 0, link_lib.client_latencies_s(
          bits, link.bandwidth_hz, link.snr_coeff, link.compute_s, xp=jnp), 0.0)
      bits = (bits * received).astype(bits.dtype)  # delivered bits
    zero = jnp.zeros((), jnp.float32)
    cov, gap, energy = zero, zero, zero
    downlink = jnp.zeros((), jnp.int32)
    if rule in lora_rules.FOLDING_RULES:  # the fold is broadcast factored, beside the factors
      downlink = value_bits * lora_rules.fold_downlink_values(rule, glob.lora,
                                                              jnp.sum(received > 0))
    if method.factor_upload:
      # What the rule's new factors leave of sum_k p_k B_k A_k (fedit: the covariance term).
      cov = (covariance_diagnostic(glob.lora, uploads.sent, weights) if rule == "fedit"
             else lora_rules.rule_error(rule, glob.lora, uploads.sent, weights, lora))
      gap, energy = client_score_diagnostics(glob.lora, uploads.sent, uploads.residual, valid)
    # Every sampled client trained, whether or not its upload arrived, so the reported loss
    # weighs them all by data size (a round whose uploads were all lost still has a loss).
    train_loss = jnp.dot(aggregation_weights(data_counts * valid), losses)
    return RoundMetrics(train_loss=train_loss, client_loss=losses, client_bits=bits,
                        client_latency_s=latency,
                        dropped_energy=(valid * uploads.dropped_energy).sum(), cov_term=cov,
                        orth_residual=global_orth_residual(lora), score_gap=gap,
                        score_energy=energy, downlink_bits=downlink)

  return metrics


def on_one_device(run_clients: ClientsFn):
  """The default runner: every slot on this device, reading the shared data."""
  def run(glob, frozen, data, scalars, ids, keys, per_client):
    return run_clients(glob, frozen, data, scalars, ids, keys, per_client, None)
  return run


def assemble(phases: RoundPhases, runner: ClientsRunner = on_one_device):
  """round_fn(state, frozen, data, client_ids [C], root_key, hparams, valid [C] | None)
  -> (state, metrics over the C slots); `valid` is 0 on padding slots (default: all real).

  The result is not jitted, so callers can wrap it (jit with donation, vmap over a sweep
  axis, ...).
  """
  run_clients = runner(phases.clients)

  def round_fn(state: ServerState, frozen: PyTree, data: FederatedData,
               client_ids: jax.Array, root_key: jax.Array, hparams: RoundHparams,
               valid: jax.Array | None = None):
    chex.assert_rank(client_ids, 1)
    slots = client_ids.shape[0]
    valid = jnp.ones((slots,), jnp.float32) if valid is None else valid
    glob = state.trainable
    round_key = jax.random.fold_in(root_key, state.round)
    # Keys follow the client id, not its slot in S_t, so a client's data order does not
    # depend on which other clients were sampled with it.
    keys = jax.vmap(lambda c: jax.random.fold_in(round_key, c))(client_ids)
    rows = _store_rows(phases, state, client_ids)
    residuals = (jax.tree.map(lambda r: r[rows], state.residuals)
                 if phases.error_feedback else None)
    corrections = (jax.tree.map(lambda c, all_c: c[None] - all_c[rows], state.control,
                                state.client_controls) if phases.scaffold else None)
    own_b = (jax.tree.map(lambda b: b[rows], state.client_factors)
             if phases.personal_b else None)
    scalars = hparams._replace(uplink=None)  # what a client reads; the links are [C]
    if phases.rule != "fedit":
      scalars = scalars._replace(factor_mask=lora_rules.trained_factors(phases.rule,
                                                                        state.round))
    # FedEx-LoRA, FLoRA: clients train on the frozen weights with every fold so far (none: no-op).
    frozen = lora_lib.fold_into(frozen, state.folded, phases.adapter_scale)
    uploads, head_deltas, losses, new_controls = run_clients(
        glob, frozen, data, scalars, client_ids, keys, (residuals, corrections, own_b))
    data_counts = data.counts[client_ids]
    received = valid if hparams.uplink is None else hparams.uplink.received * valid
    new_state, weights, bases = phases.server(state, glob, uploads, head_deltas, rows, valid,
                                              received, data_counts, new_controls, round_key)
    if own_b is not None:
      # The diagnostics read each client's factors as global + sent: FedSA's start from their own
      # B, not the global one.
      uploads = uploads._replace(sent=lora_lib.with_b_factors(uploads.sent, jax.tree.map(
          lambda d, b, g: d + b - g[None], lora_lib.b_factors(uploads.sent), own_b,
          lora_lib.b_factors(glob.lora))))
    metrics = phases.metrics(glob, new_state.trainable.lora, uploads, losses, valid, received,
                             weights, data_counts, hparams.uplink)
    if phases.host_store:
      # The host moves the rows it keeps into the new basis when it next hands them out.
      metrics = metrics._replace(bases=bases)
    return new_state, metrics

  return round_fn


def make_round(apply_fn: ApplyFn, **kwargs):
  """Builds round_fn(state, frozen, data, client_ids [K], root_key, hparams) -> (state, metrics)
  on one device; `kwargs` are `make_phases`'s. For a device mesh see `placement.place_round`."""
  return assemble(make_phases(apply_fn, **kwargs))


def slot_examples(data: FederatedData, ids: jax.Array) -> FederatedData:
  """Each slot's own examples as a one-client data set: [C, max_n, ...] images and labels, a
  [C, 1, max_n] identity table and [C, 1] counts. Batches drawn from it equal those drawn from
  `data` for the same client and key."""
  rows = data.table[ids]
  width = data.table.shape[1]
  table = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (ids.shape[0], 1, width))
  return FederatedData(images=data.images[rows], labels=data.labels[rows], table=table,
                       counts=data.counts[ids][:, None])


def _store_rows(phases: RoundPhases, state: ServerState, client_ids: jax.Array) -> jax.Array:
  """[C] rows of the per-client stores: the client ids; with a host store, which holds the
  K sampled clients in order, the slot (padding slots past K wrap around: they write nothing)."""
  if not phases.host_store or not (phases.error_feedback or phases.scaffold
                                   or phases.personal_b):
    return client_ids
  store = next(s for s in (state.residuals, state.client_controls, state.client_factors)
               if jax.tree.leaves(s))
  return jnp.arange(client_ids.shape[0], dtype=jnp.int32) % _num_rows(state, store)


def _rank(lora: PyTree) -> int:
  """r, the LoRA rank (every adapted layer has the same)."""
  return lora_lib.factor_pairs(lora)[0][0]["B"].shape[-1]


def _num_rows(state: ServerState, store: PyTree | None = None) -> int:
  """N, the clients a per-client store (default the residuals) holds (static)."""
  return jax.tree.leaves(state.residuals if store is None else store)[0].shape[0]


def _per_client(values: jax.Array, like: jax.Array) -> jax.Array:
  """[C] values shaped to broadcast against a [C, ...] array."""
  return values.reshape(values.shape + (1,) * (like.ndim - 1))
