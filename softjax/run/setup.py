"""Host-side set-up of a run, once: data, backbone, model, method, uplink plan, sweep members.

  data -> disjoint pretrain / federated split -> non-IID partition -> device arrays
  backbone (cached pretraining or a ViT .npz) -> frozen params
  wireless link (placement, devices) -> budget Tbar -> TSFA offline stage -> rank
  LoRA init at that rank; the latency controller
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

from absl import logging
import jax
from jax.sharding import Mesh
import ml_collections
import numpy as np

from softjax import config as config_lib
from softjax.config import sweep as sweep_lib
from softjax.data import layout as layout_lib
from softjax.data import partition as partition_lib
from softjax.data import sources
from softjax import errors
from softjax.errors import ConfigError
from softjax.federated import lora_rules, placement, server_opt
from softjax.federated import types as fl_types
from softjax.models import apply as apply_lib
from softjax.models import backbone as backbone_lib
from softjax.models import lora as lora_lib
from softjax.models import vit
from softjax.sparsify import payload
from softjax.sparsify import sparsifier as sparsifiers
from softjax.sparsify.payload import dense_upload_bits
from softjax.tsfa import controller as controller_lib
from softjax.tsfa import offline as offline_lib
from softjax.tsfa import pilot
from softjax.wireless import link as link_lib

HOST_STREAM_PARTITION = 1  # host rng streams: [seed, stream, ...]; 0 is client sampling


@dataclasses.dataclass
class SharedSetup:
  """What every member of a run shares: data, backbone, model, method. Built once."""
  apply_fn: Callable
  frozen: Any  # backbone params without the head, device-resident
  head: Any  # the initial head (zero-initialised, seed-independent)
  data: fl_types.FederatedData
  test: TestSets  # the evaluation subset and the whole split for the last round
  sparsifier: sparsifiers.Sparsifier
  head_params: int
  vit_config: vit.ViTConfig
  layer_dims: list[tuple[int, int]]  # (d_in, d_out) of every adapted matrix
  image_shape: tuple[int, int, int]
  pilot_spectrum: Callable[[], np.ndarray]  # the offline stage's pilot option (lazy)
  mesh: Mesh | None = None  # the device mesh (federated/placement.py); None = one device


@dataclasses.dataclass
class Member:
  """One setting of a run (a run without a sweep has exactly one)."""
  config: ml_collections.ConfigDict
  setting: dict[str, Any]  # the swept values ({} without a sweep)
  init_state: fl_types.ServerState
  uplink: UplinkPlan
  controller: controller_lib.LatencyController  # its queue is run state: run() restores it
  root_key: jax.Array


@dataclasses.dataclass(frozen=True)
class UplinkPlan:
  """What is fixed before round 0 about the uplink: Tbar, the rank, the offline stage's plan."""
  link: link_lib.Link
  tbar_s: float
  rank: int
  offline: offline_lib.OfflinePlan | None  # tsfa only
  flops_per_example: float


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


class TestSets(NamedTuple):
  """The test examples on the device: what intermediate evaluations read, and the final one.

  Each is (images, labels, masks): images/labels padded to a multiple of eval.batch_size, masks
  [M, n] with one 0/1 row per accuracy reported. `subset` holds the first eval.num_examples
  examples (mask row: those); `final` is the whole split with rows (whole split, the subset), so
  the last round reports both from one pass, the subset's number as the subset pass would give
  it (same examples in the same batches). `final` is None where the subset is the whole split
  or eval.final_full is off.
  """
  subset: tuple[jax.Array, jax.Array, jax.Array]
  final: tuple[jax.Array, jax.Array, jax.Array] | None


def _padded(dataset: sources.Dataset, n: int, n_subset: int, batch_size: int, mesh):
  """The first n test examples padded to a batch multiple, with masks [all n; first n_subset]."""
  padded = -(-n // batch_size) * batch_size
  images = np.zeros((padded,) + dataset.test_images.shape[1:], np.uint8)
  labels = np.zeros((padded,), np.int32)
  images[:n], labels[:n] = dataset.test_images[:n], dataset.test_labels[:n]
  rows = [n] if n_subset == n else [n, n_subset]
  masks = np.stack([(np.arange(padded) < k).astype(np.float32) for k in rows])
  return to_devices((images, labels, masks), mesh)


def test_sets(dataset: sources.Dataset, eval_config: ml_collections.ConfigDict,
              mesh: Mesh | None = None) -> TestSets:
  """The subset every evaluation reads and, with eval.final_full, the whole split for the last."""
  total = len(dataset.test_labels)
  n = total if eval_config.num_examples == 0 else min(eval_config.num_examples, total)
  subset = _padded(dataset, n, n, eval_config.batch_size, mesh)
  final = (_padded(dataset, total, n, eval_config.batch_size, mesh)
           if eval_config.final_full and n < total else None)
  return TestSets(subset, final)


def to_devices(tree, mesh: Mesh | None):
  """Host arrays onto the one device, or replicated over the mesh."""
  return jax.device_put(tree) if mesh is None else placement.place(tree, placement.replicated(mesh))


def federated_data(images: np.ndarray, labels: np.ndarray, clients, mesh: Mesh | None,
                   shard: bool) -> fl_types.FederatedData:
  """The clients' examples on the device(s), laid out client by client (data/layout.py).

  shard: the rows split over the mesh, each process feeding the block of its own clients.
  """
  local_devices = 1 if mesh is None else placement.mesh_size(mesh) // jax.process_count()
  layout = layout_lib.client_major_layout(
      clients, num_processes=jax.process_count() if shard else 1,
      multiple=local_devices if shard else 1)
  return fl_types.FederatedData(
      images=placement.place_examples(images, layout, mesh, shard),
      labels=placement.place_examples(labels.astype(np.int32), layout, mesh, shard),
      table=to_devices(layout.table, mesh), counts=to_devices(layout.counts, mesh))


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
  link = link_lib.make_link(config)
  compute_at = lambda r: link.compute_s(  # noqa: E731
      config.fl, apply_lib.model_flops_per_example(vit_config, r, layer_dims))
  ref_rank = config.wireless.reference_rank or config.lora.rank
  dense_bits = dense_upload_bits(layer_dims, ref_rank, config.fl.value_bits, head_params)
  tbar = link_lib.latency_budget_s(config.wireless, link, dense_bits, compute_at(ref_rank),
                                         config.fl.clients_per_round)
  rank, offline = config.lora.rank, None
  if config.controller.name == "tsfa":
    offline = _offline_stage(config, link, tbar, compute_at, layer_dims, head_params,
                             pilot_spectrum)
    rank = offline.rank
  check_budget(config, tbar, compute_at(rank))
  return UplinkPlan(link, tbar, rank, offline,
                    apply_lib.model_flops_per_example(vit_config, rank, layer_dims))


def _offline_stage(config, link, tbar: float, compute_at, layer_dims, head_params: int,
                   pilot_spectrum) -> offline_lib.OfflinePlan:
  """TSFA stage 1 on the run's link (ALGORITHM.md 5), printed as one line."""
  c = config.controller
  singular_values = pilot_spectrum() if c.spectrum == "pilot" else None
  rates = offline_lib.approx_rate_bps(link.beta, link.channel, config.fl.clients_per_round)
  offline = offline_lib.plan_offline(
      config_lib.rank_candidates(config), tbar_s=tbar, compute_s=compute_at,
      approx_rates_bps=rates,
      layer_dims=layer_dims, head_params=head_params, value_bits=config.fl.value_bits,
      quantile=c.quantile,
      weights=offline_lib.RankWeights(c.gamma, c.lambda_sp, c.lambda_cov, singular_values,
                                      participations(config)),
      whole_upload=(lora_rules.component_values(config.method.rule, layer_dims)
                    if config.method.name == "dense" else None))
  print(f"TSFA offline stage: Tbar {tbar:.4g} s, rank {offline.rank} (J: "
        + ", ".join(f"{r}: {j:.3f}" for r, j in offline.objective.items())
        + f"), O_0 {offline.keep_ratio:.3f}", flush=True)
  return offline


def participations(config: ml_collections.ConfigDict) -> float | None:
  """A client's expected participations over the run, T K / N, for the in-flight price of
  J(r); None under the `dropped` price."""
  if config.controller.sparsification_cost != "in_flight":
    return None
  return config.fl.rounds * config.fl.clients_per_round / config.fl.num_clients


def check_budget(config: ml_collections.ConfigDict, tbar_s: float, compute_s) -> None:
  """A budget Tbar that local training alone already uses up is refused (osfa / tsfa: no
  allocation can meet it, the queue would only grow) or warned about (fixed: reported only).

  Args:
    config: the run config.
    tbar_s: the budget.
    compute_s: [N] local training times of one round.
  """
  field = "wireless.budget_s" if config.wireless.budget_s > 0 else "wireless.budget_fraction"
  fastest, slowest = float(np.min(compute_s)), float(np.max(compute_s))
  if tbar_s <= fastest and config.controller.name != "fixed":
    raise ConfigError(field, config.wireless[field.split(".")[1]],
                      f"gives Tbar = {tbar_s:.4g} s, at most the fastest client's local "
                      f"training time alone ({fastest:.4g} s), so no upload can meet it; raise "
                      "the budget or wireless.device_gflops_min")
  if tbar_s <= slowest:
    logging.warning("Tbar = %.4g s is at most the local training time of the slowest clients "
                    "(up to %.4g s): rounds that sample them exceed the budget whatever they "
                    "upload (%s)", tbar_s, slowest, field)


def make_controller(config: ml_collections.ConfigDict, plan: UplinkPlan, lora_shapes,
                    layer_dims: list[tuple[int, int]],
                    head_params: int) -> controller_lib.LatencyController:
  """The per-round controller of this run, pricing uploads with the method's own accounting;
  a dense upload with its aggregation rule's (`lora_rules.upload_bits`)."""
  bits_at = functools.partial(payload.predicted_upload_bits, config.method.name, lora_shapes,
                              value_bits=config.fl.value_bits, head_params=head_params)
  payload_bits = None
  if config.method.name == "dense":
    payload_bits = functools.partial(
        lora_rules.upload_bits, config.method.rule, layer_dims, plan.rank,
        client_ranks=config_lib.client_ranks(config), value_bits=config.fl.value_bits,
        head_params=head_params)
  c = config.controller
  spec = controller_lib.ControllerSpec(
      mode=c.name, seed=config.seed, tbar_s=plan.tbar_s, rank=plan.rank, V=c.V,
      solver=c.solver, fixed_keep_ratio=config.method.keep_ratio,
      first_keep_ratio=plan.offline.keep_ratio if plan.offline else None,
      clients_per_round=config.fl.clients_per_round)
  return controller_lib.LatencyController(
      spec, plan.link, plan.link.compute_s(config.fl, plan.flops_per_example), bits_at,
      payload_bits)


def build_shared(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> SharedSetup:
  """Host-side preparation shared by every member, run once per experiment."""
  dataset, pretrain_idx, federated_idx, clients = load_federated_data(config)
  native = dataset.train_images.shape[1:]
  side = config.data.image_size or native[0]
  image_shape = (side, side, native[2])
  vit_config = vit.make_vit_config(config.model.variant, image_size=side, channels=native[2],
                                   num_classes=dataset.num_classes)
  reference = apply_lib.make_model(config, vit_config, config.lora.rank)
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
    grads = pilot.kernel_gradients(apply_lib.make_apply_fn(reference), frozen,
                                   fl_types.Trainable(lora, head), images, labels)
    return pilot.pooled_singular_values(grads)

  ref_shapes = jax.eval_shape(lambda: lora_lib.init_lora(reference, lora_key, image_shape))
  return SharedSetup(
      apply_fn=None,  # set by build_setup once the members' rank is known
      frozen=frozen, head=head, data=data,
      test=test_sets(dataset, config.eval, mesh),
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
  model = apply_lib.make_model(config, shared.vit_config, uplink.rank)
  lora = lora_lib.init_lora(model, jax.random.fold_in(jax.random.key(config.seed), 1),
                            shared.image_shape)
  tx = server_optimizer(config)
  # With a host store the device state holds the K rows of a round, never all N.
  rows = (config.fl.clients_per_round if config.fl.client_store == "host"
          else config.fl.num_clients)
  state = fl_types.init_state(
      lora, shared.head, rows, shared.sparsifier.error_feedback,
      server_opt=() if tx is None else tx.init(fl_types.Trainable(lora=lora, head=shared.head)),
      scaffold=config.fl.scaffold, personal_b=config.method.rule == "fedsa",
      fold=config.method.rule in lora_rules.FOLDING_RULES)
  member = Member(config=config, setting=setting, init_state=state,
                  uplink=uplink,
                  controller=make_controller(config, uplink, lora, shared.layer_dims,
                                             shared.head_params),
                  root_key=jax.random.fold_in(jax.random.key(config.seed), 2))
  return member, model


def build_setup(config: ml_collections.ConfigDict) -> tuple[SharedSetup, list[Member]]:
  """The shared setup and one Member per sweep setting (one without a sweep)."""
  configs = sweep_lib.member_configs(config) if sweep_lib.is_sweep(config) else [config]
  settings = sweep_lib.settings(config)
  config_lib.validate_mesh_devices(config, jax.device_count(), len(configs))
  mesh = placement.make_mesh(config.mesh.devices,
                            placement.MEMBERS if len(configs) > 1 else placement.CLIENTS)
  shared = build_shared(configs[0], mesh)
  members, models = zip(*(build_member(c, shared, s) for c, s in zip(configs, settings)))
  ranks = sorted({m.uplink.rank for m in members})
  if len(ranks) > 1:
    raise errors.SweepRanksError(
        "sweep", sweep_lib.swept_values(config),
        f"gives members different ranks {ranks} (the TSFA offline stage depends on the seed "
        "through the channel); a sweep needs one rank: sweep fewer fields or use osfa")
  shared.apply_fn = apply_lib.make_apply_fn(models[0])
  return shared, list(members)


def server_optimizer(config: ml_collections.ConfigDict):
  """The config's server optimizer (federated/server_opt.py); None for plain FedAvg."""
  s = config.server
  return server_opt.make(s.optimizer, lr=s.lr, momentum=s.momentum, b1=s.b1, b2=s.b2, tau=s.tau)


def make_sparsifier(method: ml_collections.ConfigDict) -> sparsifiers.Sparsifier:
  return sparsifiers.make_sparsifier(
      method.name, selection=method.selection, score=method.score,
      aggregation=method.aggregation, error_feedback=method.error_feedback,
      rlora_rescale=method.rlora_rescale)
