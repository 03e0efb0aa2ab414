"""The jitted round and evaluation of one experiment (vmapped over sweep members), driven one
round at a time by the host loop.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np

from softjax import config as config_lib
from softjax.federated import client_store, evaluation, placement, schedule
from softjax.federated import round as round_lib
from softjax.federated import types as fl_types
from softjax.models import lora as lora_lib
from softjax.run import state as run_state
from softjax.run.setup import Member, SharedSetup, server_optimizer
from softjax.sparsify import soft
from softjax.tsfa import controller as controller_lib


def client_parallelism(config: ml_collections.ConfigDict, mesh: Mesh | None, swept: bool,
                       backend: str) -> int:
  """fl.client_parallelism, or (0) the backend's best for the slots each device trains: a
  sweep's members each run all K; a clients mesh gives each device K_padded / D."""
  if config.fl.client_parallelism:
    return config.fl.client_parallelism
  slots = config.fl.clients_per_round
  if mesh is not None and not swept:
    slots = placement.padded_count(slots, mesh) // placement.mesh_size(mesh)
  return schedule.default_parallelism(backend, slots)


class RoundRunner:
  """The jitted round and evaluation of one experiment, with a recompile counter.

  With S > 1 members the round, the evaluation and the scores are vmapped over a leading
  member axis of the state, the client ids, the keys and the hyperparameters; the backbone and
  the data are broadcast, not copied.
  """

  def __init__(self, config: ml_collections.ConfigDict, shared: SharedSetup,
               members: list[Member]):
    fl = config.fl
    self.traces = 0
    self.config = config
    self.swept = len(members) > 1
    mesh = shared.mesh
    phases = round_lib.make_phases(
        shared.apply_fn, optimizer=fl.client_optimizer, local_steps=fl.local_steps,
        batch_size=fl.batch_size,
        client_parallelism=client_parallelism(config, mesh, self.swept, jax.default_backend()),
        sparsifier=shared.sparsifier, penalty=config.method.penalty, value_bits=fl.value_bits,
        head_params=shared.head_params, reorthogonalize=config.method.reorthogonalize,
        server_optimizer=server_optimizer(config), prox_mu=fl.prox_mu, scaffold=fl.scaffold,
        rule=config.method.rule, host_store=fl.client_store == "host",
        num_clients=fl.num_clients, adapter_scale=config.lora.alpha / config.lora.rank,
        client_ranks=config_lib.client_ranks(config))
    self.host_store = phases.host_store
    eval_fn = evaluation.make_eval(shared.apply_fn, config.eval.batch_size,
                                   phases.adapter_scale)
    scores_fn = lambda lora: [soft.component_scores(p["B"], p["A"])  # noqa: E731
                              for p in lora_lib.factor_pairs(lora)[0]]
    out_shardings = None
    if self.swept:
      round_fn = jax.vmap(round_lib.assemble(phases), in_axes=(0, None, None, 0, 0, 0))
      if mesh is not None:
        # Each device runs S / D whole settings; nothing crosses devices inside a round.
        split = P(mesh.axis_names[0])
        round_fn = jax.shard_map(round_fn, mesh=mesh,
                                 in_specs=(split, P(), P(), split, split, split),
                                 out_specs=split)
      eval_fn = jax.vmap(eval_fn, in_axes=(None, 0, 0, None, None, None))
      scores_fn = jax.vmap(scores_fn)
    else:
      round_fn = placement.place_round(phases, mesh, config.mesh.shard_data)
      if mesh is not None:
        out_shardings = placement.round_out_shardings(members[0].init_state, mesh)

    def counted_round(*args):
      self.traces += 1  # runs once per trace, not per call: the recompile guard
      return round_fn(*args)

    # The shardings of a clients-mesh round are pinned here, where it is compiled.
    self.round = jax.jit(counted_round, donate_argnums=0, out_shardings=out_shardings)
    self.eval = jax.jit(eval_fn)
    self.scores = jax.jit(scores_fn)
    self.root_keys = (jnp.stack([m.root_key for m in members]) if self.swept
                      else members[0].root_key)
    self.shared, self.members, self.config = shared, members, config

  def initial_state(self) -> run_state.RunState:
    """Every member's round-0 state (stacked for a sweep), placed as the round keeps it; with a
    host store, the N clients' initial rows on the host."""
    servers = [m.init_state for m in self.members]
    controllers = [controller_lib.init_state() for _ in self.members]
    if self.swept:
      server = run_state.stack_trees(servers)
      controller = run_state.stack_trees(controllers, xp=np)
    else:
      server, controller = servers[0], controllers[0]
    store = None
    if self.host_store:
      # The members' states hold K rows (setup.build_member); the N rows start here.
      store = client_store.ClientStore.initial(client_store.fields_of(server),
                                               self.config.fl.num_clients, self.swept,
                                               self.config.method.reorthogonalize)
      store.start(0)
    return run_state.RunState(self._placed(server), controller, store)

  def _placed(self, server: fl_types.ServerState) -> fl_types.ServerState:
    if self.shared.mesh is None:
      return jax.device_put(server)
    return placement.place_state(server, self.shared.mesh, stacked=self.swept)

  def _gathered(self, state: run_state.RunState, clients: list[np.ndarray]
                ) -> fl_types.ServerState:
    """The server state with the sampled clients' rows from the host store, on the device."""
    rows = state.server._replace(**state.clients.gather(clients))
    placed = self._placed(rows)  # the server's other fields are already placed: no copy
    return state.server._replace(**client_store.fields_of(placed))

  def _slice(self, tree, i: int):
    return run_state.member_slice(tree, i) if self.swept else tree

  def _plan(self, state: run_state.RunState, t: int):
    """Each member's sampled clients, controller plan, learning rate and round hparams."""
    need_scores = any(m.controller.reads_scores for m in self.members)
    scores = self.scores(state.server.trainable.lora) if need_scores else None
    clients, plans, lrs, hparams, controllers = [], [], [], [], []
    for i, member in enumerate(self.members):
      c, fl = member.config, member.config.fl
      ids = schedule.sample_clients(c.seed, t, fl.num_clients, fl.clients_per_round)
      member_scores = None
      if member.controller.reads_scores:
        member_scores = [np.asarray(s[i] if self.swept else s) for s in scores]
      plan, ctrl = member.controller.plan(self._slice(state.controller, i), t, ids,
                                          member_scores)
      lr = schedule.client_lr_at(t, fl.rounds, fl.client_lr, fl.lr_schedule,
                                 fl.lr_final_fraction)
      clients.append(ids)
      plans.append(plan)
      lrs.append(lr)
      controllers.append(ctrl)
      hparams.append(fl_types.make_hparams(lr, c.method.zeta, plan.keep_ratio, plan.uplink))
    return clients, plans, lrs, hparams, controllers

  def run_round(self, state: run_state.RunState, t: int):
    """Round t (0-based) -> (new state, one metrics row per member, without evaluation).

    Each member's controller decides (O_t, b_t) from the channel of round t and its global
    factors' scores; the jitted round trains, uploads and reports each client's latency; the
    realized round latency (the slowest client) feeds that member's queue.
    """
    tick = time.time()
    clients, plans, lrs, hparams, controllers = self._plan(state, t)
    server = state.server if state.clients is None else self._gathered(state, clients)
    dispatched = time.time()
    if self.swept:
      server, m = self.round(server, self.shared.frozen, self.shared.data,
                             np.stack(clients), self.root_keys, run_state.stack_trees(hparams))
    else:
      server, m = self.round(server, self.shared.frozen, self.shared.data, clients[0],
                             self.root_keys, hparams[0])
    m = jax.tree.map(np.asarray, m)  # waits for the device
    returned = time.time()
    if state.clients is not None:
      state.clients.scatter(clients, client_store.fields_of(server), m.bases)
    rows = []
    for i, (member, plan, lr) in enumerate(zip(self.members, plans, lrs)):
      mi = self._slice(m, i)
      latency = float(np.max(mi.client_latency_s))
      controllers[i] = member.controller.observe(controllers[i], latency)
      rows.append(self._row(t, i, plan, lr, mi, latency, float(controllers[i].queue)))
    # Host time: sampling, the controller's channel draw and solve, the host store's gather and
    # scatter, and the rows; the rest of the round is the device (the dispatch returns at once, np.asarray waits).
    done = time.time()
    for row in rows:
      row.update(round_time_s=done - tick, host_time_s=(dispatched - tick) + (done - returned))
    controller = (run_state.stack_trees(controllers, xp=np) if self.swept else controllers[0])
    return run_state.RunState(server, controller, state.clients), rows

  def _row(self, t: int, i: int, plan, lr: float, mi: fl_types.RoundMetrics, latency: float,
           queue: float) -> dict:
    """Member i's metrics row of round t (0-based)."""
    row = {"round": t + 1}
    if self.swept:
      row.update(member=i, **{f"sweep.{k}": v for k, v in self.members[i].setting.items()})
    row.update({
        "train_loss": float(mi.train_loss), "client_lr": lr,
        "uplink_bits": int(np.sum(mi.client_bits.astype(np.int64))),
        "keep_ratio": plan.keep_ratio, "kept_components": plan.m,
        "latency_s": latency, "predicted_latency_s": plan.predicted_latency_s,
        "queue": queue, "solver": plan.solver,
        "solver_time_s": plan.solver_time_s, "fallbacks": plan.fallbacks,
        "dropped_energy": float(mi.dropped_energy), "cov_term": float(mi.cov_term),
        "orth_residual_B": float(mi.orth_residual[0]),
        "orth_residual_A": float(mi.orth_residual[1]), "score_gap": float(mi.score_gap),
        "score_energy": float(mi.score_energy), "downlink_bits": int(mi.downlink_bits)})
    return row

  def evaluate(self, state: run_state.RunState, last: bool = False) -> list[dict[str, float]]:
    """Every member's test accuracy on the evaluation subset (`test_accuracy`); in the last
    round also on the whole split (`test_accuracy_full`), from the same pass."""
    tick = time.time()
    final = self.shared.test.final if last else None
    images, labels, masks = self.shared.test.subset if final is None else final
    correct, count = self.eval(self.shared.frozen, state.server.folded, state.server.trainable,
                               images, labels, masks)
    accuracy = np.asarray(correct).reshape(-1, masks.shape[0]) / np.asarray(count).reshape(
        -1, masks.shape[0])  # [members, mask rows]
    elapsed = time.time() - tick
    if final is None:
      return [{"test_accuracy": float(a[0]), "eval_time_s": elapsed} for a in accuracy]
    return [{"test_accuracy": float(a[1]), "test_accuracy_full": float(a[0]),
             "eval_time_s": elapsed} for a in accuracy]
