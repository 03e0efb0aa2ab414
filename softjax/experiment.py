"""The experiment: set up once on the host, then a thin loop around one jitted round.

  host, once:  data -> disjoint pretrain / federated split -> non-IID partition -> device arrays
               backbone (cached pretraining or a ViT .npz) -> frozen params
               wireless link (placement, devices) -> budget Tbar -> TSFA offline stage -> rank
               LoRA init at that rank; the latency controller (controller.py)
               orbax: restore the whole run state (and the virtual queue) from a checkpoint
  each round:  host samples S_t -> controller: channel draw, (O_t, b_t) -> device round_fn
               -> realized latency -> queue -> metrics row -> eval / checkpoint
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from softjax import backbone as backbone_lib
from softjax import checkpointing
from softjax import config as config_lib
from softjax import controller as controller_lib
from softjax import federated
from softjax import mesh as mesh_lib
from softjax import metrics as metrics_lib
from softjax import payload
from softjax import pilot
from softjax import soft
from softjax import sparsifiers
from softjax import sweep as sweep_lib
from softjax import tsfa
from softjax import wireless
from softjax.data import partition as partition_lib
from softjax.data import sources
from softjax.models import lora as lora_lib
from softjax.models import vit

HOST_STREAM_PARTITION = 1  # host rng streams: [seed, stream, ...]; 0 is client sampling


class NonFiniteLossError(FloatingPointError):
  """Training produced NaN/inf; the last good checkpoint is kept."""


class WorkdirError(OSError):
  """The workdir cannot be created or written; raised before any setup or compilation."""


def prepare_workdir(workdir: str) -> None:
  """Creates `workdir` and checks that a file can be written in it."""
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise WorkdirError(f"--workdir {workdir} is not a writable directory ({e}); choose another "
                       "--workdir") from e


def _check_finite_state(tree: dict, round_number: int, directory: str) -> None:
  """Refuses to checkpoint NaN/inf parameters (a loss can be finite while the update is not)."""
  bad = [jax.tree_util.keystr(path) for path, x in jax.tree_util.tree_leaves_with_path(tree)
         if not bool(jnp.all(jnp.isfinite(x)))]
  if bad:
    raise NonFiniteLossError(
        f"round {round_number}: the run state has NaN/inf values in {', '.join(bad[:3])}"
        f"{' ...' if len(bad) > 3 else ''} (the training loss was still finite); it is not "
        f"checkpointed, the last good checkpoint in {directory} is kept. Lower fl.client_lr.")


@dataclasses.dataclass
class SharedSetup:
  """What every member of a run shares: data, backbone, model, method. Built once."""
  apply_fn: Callable
  frozen: Any  # backbone params without the head, device-resident
  head: Any  # the initial head (zero-initialised, seed-independent)
  data: federated.FederatedData
  test: tuple[jax.Array, jax.Array, jax.Array]  # padded images, labels, mask
  sparsifier: sparsifiers.Sparsifier
  head_params: int
  vit_config: vit.ViTConfig
  layer_dims: list[tuple[int, int]]  # (d_in, d_out) of every adapted matrix
  image_shape: tuple[int, int, int]
  pilot_spectrum: Callable[[], np.ndarray]  # the offline stage's pilot option (lazy)
  mesh: Mesh | None = None  # the device mesh (softjax/mesh.py); None = one device


@dataclasses.dataclass
class Member:
  """One setting of a run (a run without a sweep has exactly one)."""
  config: ml_collections.ConfigDict
  setting: dict[str, Any]  # the swept values ({} without a sweep)
  init_state: federated.ServerState
  uplink: UplinkPlan
  controller: controller_lib.LatencyController  # its queue is run state: run() restores it
  root_key: jax.Array


@dataclasses.dataclass(frozen=True)
class UplinkPlan:
  """What is fixed before round 0 about the uplink: Tbar, the rank, the offline stage's plan."""
  link: controller_lib.Link
  tbar_s: float
  rank: int
  offline: tsfa.OfflinePlan | None  # tsfa only
  flops_per_example: float


def make_apply_fn(model: vit.VisionTransformer) -> federated.ApplyFn:
  """apply_fn(frozen, trainable, images) -> logits, resizing images to the model's input size."""
  size = model.config.image_size

  def apply_fn(frozen, trainable, images):
    if images.shape[1:3] != (size, size):
      images = jax.image.resize(images, (images.shape[0], size, size, images.shape[3]),
                                "bilinear")
    params = lora_lib.join_head(frozen, trainable.head)
    return model.apply({"params": params, "lora": trainable.lora}, images)

  return apply_fn


def load_federated_data(config: ml_collections.ConfigDict):
  """Loads the data set, splits off the pretraining images and partitions the rest.

  Returns:
    (dataset, pretrain_idx, federated_idx, client_indices) with client_indices indexing into
    federated_idx.
  """
  dataset = sources.load_dataset(config.data.name, config.data.data_dir or None)
  pretrain_idx, federated_idx = sources.pretrain_federated_split(
      len(dataset.train_labels), config.data.pretrain_fraction)
  config_lib.validate_against_data(config, num_classes=dataset.num_classes,
                                   num_federated=len(federated_idx))
  rng = np.random.default_rng([config_lib.partition_seed(config), HOST_STREAM_PARTITION])
  clients = partition_lib.partition(
      dataset.train_labels[federated_idx], config.fl.num_clients, config.data.partition, rng=rng,
      shards_per_client=config.data.shards_per_client,
      dirichlet_alpha=config.data.dirichlet_alpha)
  config_lib.validate_against_data(config, num_classes=dataset.num_classes,
                                   client_sizes=[len(c) for c in clients])
  return dataset, pretrain_idx, federated_idx, clients


def padded_test_set(dataset: sources.Dataset, num_examples: int, batch_size: int,
                    mesh: Mesh | None = None):
  """Test images/labels padded to a multiple of batch_size, with a 0/1 mask for padding."""
  n = len(dataset.test_labels) if num_examples == 0 else min(num_examples,
                                                             len(dataset.test_labels))
  padded = -(-n // batch_size) * batch_size
  images = np.zeros((padded,) + dataset.test_images.shape[1:], np.uint8)
  labels = np.zeros((padded,), np.int32)
  images[:n], labels[:n] = dataset.test_images[:n], dataset.test_labels[:n]
  mask = (np.arange(padded) < n).astype(np.float32)
  return to_devices((images, labels, mask), mesh)


def to_devices(tree, mesh: Mesh | None):
  """Host arrays onto the one device, or replicated over the mesh."""
  return jax.device_put(tree) if mesh is None else mesh_lib.place(tree, mesh_lib.replicated(mesh))


def federated_data(images: np.ndarray, labels: np.ndarray, clients, mesh: Mesh | None,
                   shard: bool) -> federated.FederatedData:
  """The clients' examples on the device(s), laid out client by client (mesh.py).

  shard: the rows split over the mesh, each process feeding the block of its own clients.
  """
  local_devices = 1 if mesh is None else mesh_lib.mesh_size(mesh) // jax.process_count()
  layout = mesh_lib.client_major_layout(
      clients, num_processes=jax.process_count() if shard else 1,
      multiple=local_devices if shard else 1)
  return federated.FederatedData(
      images=mesh_lib.place_examples(images, layout, mesh, shard),
      labels=mesh_lib.place_examples(labels.astype(np.int32), layout, mesh, shard),
      table=to_devices(layout.table, mesh), counts=to_devices(layout.counts, mesh))


def _make_model(config, vit_config: vit.ViTConfig, rank: int) -> vit.VisionTransformer:
  # A rank chosen by the offline stage keeps the config's adapter scale alpha / r.
  alpha = config.lora.alpha * rank / config.lora.rank
  return vit.VisionTransformer(vit_config, vit.LoRAConfig(
      rank=rank, alpha=alpha, targets=config_lib.lora_targets(config)))


def flops_per_example(vit_config: vit.ViTConfig, rank: int,
                      layer_dims: list[tuple[int, int]]) -> float:
  """Training FLOPs of one example of this run's model (wireless.flops_per_example)."""
  c = vit_config
  return wireless.flops_per_example(
      seq_len=(c.image_size // c.patch_size) ** 2 + 1, width=c.width, depth=c.depth,
      mlp_dim=c.mlp_dim, num_classes=c.num_classes, patch_dim=c.patch_size ** 2 * c.channels,
      lora_rank=rank, lora_layer_dims=layer_dims)


def plan_uplink(config: ml_collections.ConfigDict, vit_config: vit.ViTConfig,
                layer_dims: list[tuple[int, int]], head_params: int,
                pilot_spectrum=None) -> UplinkPlan:
  """The link, the budget Tbar and, for tsfa, the offline stage (ALGORITHM.md 4, 5).

  Args:
    config: the run config.
    vit_config: the model architecture.
    layer_dims: (d_in, d_out) of every adapted matrix.
    head_params: head values.
    pilot_spectrum: a callable returning singular values (controller.spectrum = pilot).
  """
  link = controller_lib.make_link(config)
  compute_at = lambda r: link.compute_s(  # noqa: E731
      config.fl, flops_per_example(vit_config, r, layer_dims))
  ref_rank = config.wireless.reference_rank or config.lora.rank
  dense_bits = dense_upload_bits(layer_dims, ref_rank, config.fl.value_bits, head_params)
  tbar = controller_lib.latency_budget_s(config.wireless, link, dense_bits, compute_at(ref_rank),
                                         config.fl.clients_per_round)
  rank, offline = config.lora.rank, None
  if config.controller.name == "tsfa":
    c = config.controller
    singular_values = pilot_spectrum() if c.spectrum == "pilot" else None
    rates = tsfa.approx_rate_bps(link.beta, link.channel, config.fl.clients_per_round)
    offline = tsfa.plan_offline(
        config_lib.rank_candidates(config), tbar_s=tbar, compute_s=compute_at,
        approx_rates_bps=rates,
        layer_dims=layer_dims, head_params=head_params, value_bits=config.fl.value_bits,
        quantile=c.quantile, gamma=c.gamma, lambda_sp=c.lambda_sp, lambda_cov=c.lambda_cov,
        singular_values=singular_values)
    rank = offline.rank
    print(f"TSFA offline stage: Tbar {tbar:.4g} s, rank {rank} (J: "
          + ", ".join(f"{r}: {j:.3f}" for r, j in offline.objective.items())
          + f"), O_0 {offline.keep_ratio:.3f}", flush=True)
  return UplinkPlan(link, tbar, rank, offline, flops_per_example(vit_config, rank, layer_dims))


def dense_upload_bits(layer_dims, rank: int, value_bits: int, head_params: int) -> int:
  """Bits of a dense upload at `rank` (ALGORITHM.md 2.5 with m = r)."""
  return payload.lora_upload_bits(layer_dims, rank=rank, kept=rank, value_bits=value_bits,
                                  head_params=head_params)


def make_controller(config: ml_collections.ConfigDict, plan: UplinkPlan, lora_shapes,
                    head_params: int) -> controller_lib.LatencyController:
  """The per-round controller of this run, pricing uploads with the method's own accounting."""
  bits_at = functools.partial(sparsifiers.predicted_upload_bits, config.method.name, lora_shapes,
                              value_bits=config.fl.value_bits, head_params=head_params)
  c = config.controller
  return controller_lib.LatencyController(
      c.name, plan.link, plan.link.compute_s(config.fl, plan.flops_per_example),
      seed=config.seed, tbar_s=plan.tbar_s, rank=plan.rank, bits_at=bits_at, V=c.V,
      solver=c.solver, fixed_keep_ratio=config.method.keep_ratio,
      first_keep_ratio=plan.offline.keep_ratio if plan.offline else None,
      clients_per_round=config.fl.clients_per_round)


def build_shared(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> SharedSetup:
  """Host-side preparation shared by every member, run once per experiment."""
  dataset, pretrain_idx, federated_idx, clients = load_federated_data(config)
  native = dataset.train_images.shape[1:]
  side = config.data.image_size or native[0]
  image_shape = (side, side, native[2])
  vit_config = vit.make_vit_config(config.model.variant, image_size=side, channels=native[2],
                                   num_classes=dataset.num_classes)
  reference = _make_model(config, vit_config, config.lora.rank)
  params = backbone_lib.load_backbone(config, reference, dataset, pretrain_idx, image_shape)
  frozen, head = lora_lib.split_head(params)
  data = federated_data(dataset.train_images[federated_idx],
                        dataset.train_labels[federated_idx], clients, mesh,
                        config.mesh.shard_data)
  frozen = to_devices(frozen, mesh)
  lora_key = jax.random.key(0)  # shapes only, and the pilot gradient (taken at B = 0)

  def pilot_spectrum():
    lora = lora_lib.init_lora(reference, lora_key, image_shape)
    images, labels = pilot.pilot_batch(data, config.controller.pilot_batches,
                                       config.fl.batch_size)
    grads = pilot.kernel_gradients(make_apply_fn(reference), frozen,
                                   federated.Trainable(lora, head), images, labels)
    return pilot.pooled_singular_values(grads)

  ref_shapes = jax.eval_shape(lambda: lora_lib.init_lora(reference, lora_key, image_shape))
  return SharedSetup(
      apply_fn=None,  # set by build_setup once the members' rank is known
      frozen=frozen, head=head, data=data,
      test=padded_test_set(dataset, config.eval.num_examples, config.eval.batch_size, mesh),
      sparsifier=make_sparsifier(config.method),
      head_params=sum(int(np.size(x)) for x in jax.tree.leaves(head)),
      vit_config=vit_config,
      layer_dims=[(d_in, d_out) for _, d_in, d_out in lora_lib.lora_layer_dims(ref_shapes)],
      image_shape=image_shape, pilot_spectrum=pilot_spectrum, mesh=mesh)


def build_member(config: ml_collections.ConfigDict, shared: SharedSetup,
                 setting: dict[str, Any]) -> tuple[Member, vit.VisionTransformer]:
  """The member's uplink plan (and rank), initial state and controller."""
  uplink = plan_uplink(config, shared.vit_config, shared.layer_dims, shared.head_params,
                       shared.pilot_spectrum)
  model = _make_model(config, shared.vit_config, uplink.rank)
  lora = lora_lib.init_lora(model, jax.random.fold_in(jax.random.key(config.seed), 1),
                            shared.image_shape)
  state = federated.init_state(lora, shared.head, config.fl.num_clients,
                               shared.sparsifier.error_feedback)
  member = Member(config=config, setting=setting, init_state=state,
                  uplink=uplink,
                  controller=make_controller(config, uplink, lora, shared.head_params),
                  root_key=jax.random.fold_in(jax.random.key(config.seed), 2))
  return member, model


def build_setup(config: ml_collections.ConfigDict) -> tuple[SharedSetup, list[Member]]:
  """The shared setup and one Member per sweep setting (one without a sweep)."""
  configs = sweep_lib.member_configs(config) if sweep_lib.is_sweep(config) else [config]
  settings = sweep_lib.settings(config)
  config_lib.validate_mesh_devices(config, jax.device_count(), len(configs))
  mesh = mesh_lib.make_mesh(config.mesh.devices,
                            mesh_lib.MEMBERS if len(configs) > 1 else mesh_lib.CLIENTS)
  shared = build_shared(configs[0], mesh)
  members, models = zip(*(build_member(c, shared, s) for c, s in zip(configs, settings)))
  ranks = sorted({m.uplink.rank for m in members})
  if len(ranks) > 1:
    raise config_lib.ConfigError(
        "sweep", sweep_lib.swept_values(config),
        f"gives members different ranks {ranks} (the TSFA offline stage depends on the seed "
        "through the channel); a sweep needs one rank: sweep fewer fields or use osfa")
  shared.apply_fn = make_apply_fn(models[0])
  return shared, list(members)


def make_sparsifier(method: ml_collections.ConfigDict) -> sparsifiers.Sparsifier:
  return sparsifiers.make_sparsifier(
      method.name, selection=method.selection, score=method.score,
      aggregation=method.aggregation, error_feedback=method.error_feedback,
      rlora_rescale=method.rlora_rescale)


def _state_to_tree(state: federated.ServerState) -> dict:
  return {"lora": state.trainable.lora, "head": state.trainable.head, "round": state.round,
          "residuals": state.residuals}


def _tree_to_state(tree: dict) -> federated.ServerState:
  return federated.ServerState(
      trainable=federated.Trainable(lora=tree["lora"], head=tree["head"]), round=tree["round"],
      residuals=tree.get("residuals", {}))


def restore_or_init(ckpt: checkpointing.RunCheckpointer, config: ml_collections.ConfigDict,
                    init_state: federated.ServerState):
  """(state, host record, completed rounds) from the newest checkpoint, or the initial state."""
  restored = ckpt.restore_latest(_state_to_tree(init_state))
  if restored is None:
    return init_state, {}, 0
  step, tree, host = restored
  conflicts = config_lib.resume_conflicts(host["config"], config)
  saved_rounds = host["config"]["fl"]["rounds"]
  if config.fl.lr_schedule != "constant" and saved_rounds != config.fl.rounds:
    conflicts.append(f"fl.rounds: checkpoint has {saved_rounds}, command has "
                     f"{config.fl.rounds}; with fl.lr_schedule={config.fl.lr_schedule!r} the "
                     "number of rounds shapes the learning rate of every round")
  if conflicts:
    raise checkpointing.CheckpointError(
        f"the checkpoint in {ckpt.directory} was made with a different config; resume with the "
        "same settings (only " + ", ".join(config_lib.RESUMABLE_FIELDS) + " may change) or use "
        "a new --workdir. Differences:\n  " + "\n  ".join(conflicts))
  print(f"resuming from {ckpt.directory} after {step} completed rounds", flush=True)
  return _tree_to_state(tree), host, step


def stack_trees(trees):
  """Stacks pytrees on a new leading axis (the sweep axis)."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def member_slice(tree, i: int):
  return jax.tree.map(lambda x: x[i], tree)


def client_parallelism(config: ml_collections.ConfigDict, mesh: Mesh | None, swept: bool,
                       backend: str) -> int:
  """fl.client_parallelism, or (0) the backend's best for the slots each device trains: a
  sweep's members each run all K; a clients mesh gives each device K_padded / D."""
  if config.fl.client_parallelism:
    return config.fl.client_parallelism
  slots = config.fl.clients_per_round
  if mesh is not None and not swept:
    slots = mesh_lib.padded_count(slots, mesh) // mesh_lib.mesh_size(mesh)
  return federated.default_parallelism(backend, slots)


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
    self.swept = len(members) > 1
    mesh = shared.mesh
    round_fn = federated.make_round(
        shared.apply_fn, optimizer=fl.client_optimizer, local_steps=fl.local_steps,
        batch_size=fl.batch_size,
        client_parallelism=client_parallelism(config, mesh, self.swept, jax.default_backend()),
        sparsifier=shared.sparsifier, penalty=config.method.penalty, value_bits=fl.value_bits,
        head_params=shared.head_params, mesh=None if self.swept else mesh,
        shard_data=config.mesh.shard_data)
    eval_fn = federated.make_eval(shared.apply_fn, config.eval.batch_size)
    scores_fn = lambda lora: [soft.component_scores(p["B"], p["A"])  # noqa: E731
                              for p in soft.factor_pairs(lora)[0]]
    if self.swept:
      round_fn = jax.vmap(round_fn, in_axes=(0, None, None, 0, 0, 0))
      if mesh is not None:
        # Each device runs S / D whole settings; nothing crosses devices inside a round.
        split = P(mesh.axis_names[0])
        round_fn = jax.shard_map(round_fn, mesh=mesh,
                                 in_specs=(split, P(), P(), split, split, split),
                                 out_specs=split, check_vma=False)
      eval_fn = jax.vmap(eval_fn, in_axes=(None, 0, None, None, None))
      scores_fn = jax.vmap(scores_fn)

    def counted_round(*args):
      self.traces += 1  # runs once per trace, not per call: the recompile guard
      return round_fn(*args)

    self.round = jax.jit(counted_round, donate_argnums=0)
    self.eval = jax.jit(eval_fn)
    self.scores = jax.jit(scores_fn)
    self.root_keys = (jnp.stack([m.root_key for m in members]) if self.swept
                      else members[0].root_key)
    self.shared, self.members, self.config = shared, members, config

  def initial_state(self) -> federated.ServerState:
    """Every member's round-0 state (stacked for a sweep), placed as the round keeps it."""
    states = [m.init_state for m in self.members]
    state = stack_trees(states) if self.swept else states[0]
    if self.shared.mesh is None:
      return jax.device_put(state)
    return mesh_lib.place_state(state, self.shared.mesh, stacked=self.swept)

  def _slice(self, tree, i: int):
    return member_slice(tree, i) if self.swept else tree

  def run_round(self, state: federated.ServerState, t: int):
    """Round t (0-based) -> (new state, one metrics row per member, without evaluation).

    Each member's controller decides (O_t, b_t) from the channel of round t and its global
    factors' scores; the jitted round trains, uploads and reports each client's latency; the
    realized round latency (the slowest client) feeds that member's queue.
    """
    tick = time.time()
    need_scores = any(m.controller.mode != "fixed" for m in self.members)
    scores = self.scores(state.trainable.lora) if need_scores else None
    clients, plans, lrs, hparams = [], [], [], []
    for i, member in enumerate(self.members):
      c, fl = member.config, member.config.fl
      ids = federated.sample_clients(c.seed, t, fl.num_clients, fl.clients_per_round)
      member_scores = None
      if member.controller.mode != "fixed":
        member_scores = [np.asarray(s[i] if self.swept else s) for s in scores]
      plan = member.controller.plan(t, ids, member_scores)
      lr = federated.client_lr_at(t, fl.rounds, fl.client_lr, fl.lr_schedule,
                                  fl.lr_final_fraction)
      clients.append(ids)
      plans.append(plan)
      lrs.append(lr)
      hparams.append(federated.make_hparams(lr, c.method.zeta, plan.keep_ratio, plan.uplink))
    dispatched = time.time()
    if self.swept:
      state, m = self.round(state, self.shared.frozen, self.shared.data, np.stack(clients),
                            self.root_keys, stack_trees(hparams))
    else:
      state, m = self.round(state, self.shared.frozen, self.shared.data, clients[0],
                            self.root_keys, hparams[0])
    m = jax.tree.map(np.asarray, m)  # waits for the device
    returned = time.time()
    rows = []
    for i, (member, plan, lr) in enumerate(zip(self.members, plans, lrs)):
      mi = self._slice(m, i)
      latency = float(np.max(mi.client_latency_s))
      row = {"round": t + 1}
      if self.swept:
        row.update(member=i, **{f"sweep.{k}": v for k, v in member.setting.items()})
      row.update({
          "train_loss": float(mi.train_loss), "client_lr": lr,
          "uplink_bits": int(np.sum(mi.client_bits.astype(np.int64))),
          "keep_ratio": plan.keep_ratio, "kept_components": plan.m,
          "latency_s": latency, "predicted_latency_s": plan.predicted_latency_s,
          "queue": member.controller.observe(latency), "solver": plan.solver,
          "solver_time_s": plan.solver_time_s, "fallbacks": plan.fallbacks,
          "dropped_energy": float(mi.dropped_energy), "cov_term": float(mi.cov_term),
          "orth_residual_B": float(mi.orth_residual[0]),
          "orth_residual_A": float(mi.orth_residual[1])})
      rows.append(row)
    # Host time: sampling, the controller's channel draw and solve, and the rows; the rest of
    # the round is the device (the dispatch returns at once, np.asarray waits).
    done = time.time()
    for row in rows:
      row.update(round_time_s=done - tick, host_time_s=(dispatched - tick) + (done - returned))
    return state, rows

  def evaluate(self, state: federated.ServerState) -> list[dict[str, float]]:
    """Test accuracy of every member's global model."""
    tick = time.time()
    correct, count = self.eval(self.shared.frozen, state.trainable, *self.shared.test)
    correct, count = np.atleast_1d(np.asarray(correct)), np.atleast_1d(np.asarray(count))
    elapsed = time.time() - tick
    return [{"test_accuracy": float(c) / float(n), "eval_time_s": elapsed}
            for c, n in zip(correct, count)]


def _host_record(config: ml_collections.ConfigDict, cum_bits: list[int],
                 members: list[Member]) -> dict[str, Any]:
  return {"config": json.loads(config.to_json_best_effort()), "cum_uplink_bits": cum_bits,
          "controllers": [m.controller.state_dict() for m in members]}


def _member_summary(member: Member, rows: list[dict[str, Any]], cum_bits: int
                    ) -> dict[str, Any]:
  evaluated = [r for r in rows if "test_accuracy" in r]
  latencies = [r["latency_s"] for r in rows if "latency_s" in r]
  return {"setting": member.setting,
          "final_accuracy": evaluated[-1]["test_accuracy"] if evaluated else None,
          "cum_uplink_bits": cum_bits, "rank": member.uplink.rank,
          "latency_budget_s": member.uplink.tbar_s,
          "offline": (dataclasses.asdict(member.uplink.offline) if member.uplink.offline
                      else None),
          # Rows written before latency was simulated (older runs resumed) have none.
          "mean_latency_s": float(np.mean(latencies)) if latencies else None,
          "max_queue": max((r["queue"] for r in rows if "queue" in r), default=None),
          "rows": rows}


def run(config: ml_collections.ConfigDict, workdir: str, *,
        on_round_end: Callable[[int], None] | None = None) -> dict[str, Any]:
  """Runs (or resumes) a federated experiment; writes config.json, metrics.jsonl, checkpoints.

  A config with a sweep block runs all its settings as one vmapped program (softjax/sweep.py);
  metrics.jsonl then holds one row per member and round, tagged with `member` and the swept
  values.

  Args:
    config: a ConfigDict from configs/ (validated here).
    workdir: output directory; a checkpoint in it is resumed.
    on_round_end: called with the completed round number after its rows and checkpoint are
      written (tests use it to interrupt a run at a known point).

  Returns:
    A summary dict: final_accuracy, rounds, cum_uplink_bits, wall_time_s, round_traces, rows,
    lora_template (shapes of the LoRA tree), rank (the offline stage's under tsfa),
    latency_budget_s (Tbar), offline (the tsfa plan or None), mean_latency_s, max_queue. For a
    sweep, `members` holds that dict (and `setting`) per member, and the top level only
    rounds, wall_time_s, round_traces, rows and lora_template.
  """
  config_lib.validate(config)
  if config.mesh.distributed:
    m = config.mesh  # before anything touches a device
    mesh_lib.initialize_distributed(m.coordinator_address, m.num_processes, m.process_id)
  prepare_workdir(workdir)
  start = time.time()
  shared, members = build_setup(config)
  if shared.mesh is not None:
    print(f"mesh: {mesh_lib.mesh_size(shared.mesh)} {shared.mesh.devices.flat[0].platform} "
          f"devices over the {shared.mesh.axis_names[0]!r} axis, {jax.process_count()} "
          "process(es)", flush=True)
  runner = RoundRunner(config, shared, members)
  # Shapes only: the state's buffers are donated to the first round.
  lora_template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                               members[0].init_state.trainable.lora)
  ckpt = checkpointing.RunCheckpointer(os.path.join(workdir, "checkpoints"),
                                       every=config.checkpoint.every, keep=config.checkpoint.keep)
  try:
    state, host, done = restore_or_init(ckpt, config, runner.initial_state())
  except Exception:
    ckpt.close()
    raise
  for member, saved in zip(members, host.get("controllers", [])):
    member.controller.load_state_dict(saved)
  # Every process of a multi-host run computes the same rows; process 0 owns the usual files.
  process = jax.process_index()
  if process == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  metrics_name = "metrics.jsonl" if process == 0 else f"metrics.process{process}.jsonl"
  writer = metrics_lib.MetricsWriter(os.path.join(workdir, metrics_name), resume_round=done)
  cum_bits = host.get("cum_uplink_bits", [0] * len(members))
  cum_bits = list(cum_bits) if isinstance(cum_bits, list) else [cum_bits]  # older: one int
  rounds, loop_start = config.fl.rounds, time.time()
  try:
    for t in range(done, rounds):
      state, rows = runner.run_round(state, t)
      for i, row in enumerate(rows):
        if not np.isfinite(row["train_loss"]):
          where = f" (sweep member {i}: {members[i].setting})" if runner.swept else ""
          raise NonFiniteLossError(
              f"round {t + 1}{where}: training loss is {row['train_loss']}; the last good "
              f"checkpoint in {ckpt.directory} is kept. Lower fl.client_lr "
              f"(now {members[i].config.fl.client_lr}).")
        cum_bits[i] += row["uplink_bits"]
        row["cum_uplink_bits"] = cum_bits[i]
      if (t + 1) % config.eval.every == 0 or t + 1 == rounds:
        for row, result in zip(rows, runner.evaluate(state)):
          row.update(result)
      for row in rows:
        writer.write(row)
      rate = (t + 1 - done) / max(time.time() - loop_start, 1e-9)
      line = metrics_lib.progress_line(rows[0], rounds, rate)
      print(line + (f" | member 1 of {len(rows)}" if runner.swept else ""), flush=True)
      if ckpt.should_save(t + 1, rounds):
        tree = _state_to_tree(state)
        _check_finite_state(tree, t + 1, ckpt.directory)
        ckpt.save(t + 1, tree, _host_record(config, cum_bits, members))
      if on_round_end is not None:
        on_round_end(t + 1)
  finally:
    writer.close()
    ckpt.close()

  rows = writer.rows
  per_member = [_member_summary(m, [r for r in rows if r.get("member", 0) == i], cum_bits[i])
                for i, m in enumerate(members)]
  common = {"rounds": rounds, "wall_time_s": time.time() - start,
            "devices": mesh_lib.mesh_size(shared.mesh),
            "round_traces": runner.traces, "rows": rows, "lora_template": lora_template}
  if runner.swept:
    summary = {**common, "members": per_member}
    for m in per_member:
      print(f"member {m['setting']}: final test accuracy {m['final_accuracy']:.4f} | uplink "
            f"{m['cum_uplink_bits'] / 8e6:.2f} MB", flush=True)
    print(f"{len(members)} members in one program | wall time {common['wall_time_s']:.1f} s",
          flush=True)
  else:
    summary = {**per_member[0], **common}
    del summary["setting"]
    print(metrics_lib.summary_table(rows), flush=True)
    print(f"final test accuracy {summary['final_accuracy']:.4f} | uplink "
          f"{summary['cum_uplink_bits'] / 8e6:.2f} MB | wall time {summary['wall_time_s']:.1f} s",
          flush=True)
  return summary
