"""Validation of a run config: one message naming the field and what is allowed.

`validate` checks every field before anything is traced; `validate_against_data` and
`validate_against_model` check the rules that need the loaded dataset or the architecture, and
`validate_mesh_devices` the ones that need the device count. Each range rule is written here
once; every number must be finite (a NaN or an infinity is never a meaningful setting).
"""

from __future__ import annotations

from typing import Iterable

import ml_collections

from softjax.config import choices, rules, sweep
from softjax.config.defaults import lora_targets, metrics_writers


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every field that does not need the data; raises ConfigError on the first bad one."""
  rules.integer("seed", config.seed, 0)
  _validate_data(config)
  _validate_model(config)
  _validate_method(config.method)
  _validate_fl(config.fl)
  _validate_server(config)
  _validate_rule(config)
  _validate_wireless(config.wireless)
  _validate_controller(config)
  _validate_mesh(config)
  rules.integer("eval.every", config.eval.every, 1)
  rules.integer("eval.num_examples", config.eval.num_examples, 0, what=" (0 = whole test split)")
  rules.integer("eval.batch_size", config.eval.batch_size, 1)
  rules.boolean("eval.final_full", config.eval.final_full)
  rules.integer("checkpoint.every", config.checkpoint.every, 1)
  rules.integer("checkpoint.keep", config.checkpoint.keep, 1)
  for writer in metrics_writers(config):
    rules.choice("metrics.writers", writer, choices.METRICS_WRITERS)
  rules.check(isinstance(config.metrics.wandb_project, str) and config.metrics.wandb_project,
              "metrics.wandb_project", config.metrics.wandb_project, "must be a project name")
  _validate_sweep(config)


def _validate_data(config: ml_collections.ConfigDict) -> None:
  d = config.data
  rules.choice("data.name", d.name, choices.DATA_SOURCES)
  rules.check(isinstance(d.data_dir, str), "data.data_dir", d.data_dir,
              "must be a directory path or '' (the source's default location)")
  rules.number("data.pretrain_fraction", d.pretrain_fraction, 0, 1, open_high=True)
  rules.integer("data.image_size", d.image_size, 0, what=" (0 = native size)")
  rules.choice("data.partition", d.partition, choices.PARTITIONS)
  rules.integer("data.shards_per_client", d.shards_per_client, 1)
  rules.positive("data.dirichlet_alpha", d.dirichlet_alpha)
  rules.integer("data.partition_seed", d.partition_seed, -1, what=" (-1 = seed)")


def _validate_model(config: ml_collections.ConfigDict) -> None:
  rules.choice("model.variant", config.model.variant, choices.MODEL_VARIANTS)
  backbone = config.model.backbone
  rules.check(backbone in choices.BACKBONE_KINDS or str(backbone).endswith(".npz"), "model.backbone",
              backbone,
              f"must be one of {', '.join(choices.BACKBONE_KINDS)} or a path to a .npz checkpoint")
  if backbone == "pretrain":
    rules.check(config.data.pretrain_fraction > 0, "data.pretrain_fraction",
                config.data.pretrain_fraction,
                "must be > 0 when model.backbone = 'pretrain' (the backbone needs held-out images)")
  p = config.pretrain
  rules.integer("pretrain.num_classes", p.num_classes, 1)
  rules.integer("pretrain.steps", p.steps, 1)
  rules.integer("pretrain.batch_size", p.batch_size, 1)
  rules.positive("pretrain.learning_rate", p.learning_rate)
  rules.number("pretrain.weight_decay", p.weight_decay, 0)
  rules.integer("lora.rank", config.lora.rank, 1)
  rules.positive("lora.alpha", config.lora.alpha)
  rules.lora_targets("lora.targets", lora_targets(config))


def _validate_fl(fl: ml_collections.ConfigDict) -> None:
  rules.integer("fl.num_clients", fl.num_clients, 1)
  rules.integer("fl.clients_per_round", fl.clients_per_round, 1, fl.num_clients,
                " (at most fl.num_clients)")
  rules.integer("fl.rounds", fl.rounds, 1)
  rules.integer("fl.local_steps", fl.local_steps, 1)
  rules.integer("fl.batch_size", fl.batch_size, 1)
  rules.choice("fl.client_optimizer", fl.client_optimizer, choices.CLIENT_OPTIMIZERS)
  rules.positive("fl.client_lr", fl.client_lr)
  rules.choice("fl.lr_schedule", fl.lr_schedule, choices.LR_SCHEDULES)
  rules.number("fl.lr_final_fraction", fl.lr_final_fraction, 0, 1)
  rules.integer("fl.client_parallelism", fl.client_parallelism, 0, fl.clients_per_round,
                " (at most fl.clients_per_round; 0 = the backend's best)")
  rules.choice("fl.value_bits", fl.value_bits, choices.PAYLOAD_VALUE_BITS)
  rules.number("fl.prox_mu", fl.prox_mu, 0, what=" (FedProx's proximal weight; 0 = off)")
  rules.boolean("fl.scaffold", fl.scaffold)
  rules.choice("fl.client_store", fl.client_store, choices.CLIENT_STORES)
  rules.check(not fl.scaffold or fl.client_optimizer == "sgd", "fl.scaffold", fl.scaffold,
              f"needs fl.client_optimizer=sgd (its control update assumes SGD steps), not "
              f"{fl.client_optimizer}")


def _validate_server(config: ml_collections.ConfigDict) -> None:
  s = config.server
  rules.choice("server.optimizer", s.optimizer, choices.SERVER_OPTIMIZERS)
  rules.positive("server.lr", s.lr)
  rules.number("server.momentum", s.momentum, 0, 1, open_high=True)
  rules.number("server.b1", s.b1, 0, 1, open_high=True)
  rules.number("server.b2", s.b2, 0, 1, open_high=True)
  rules.positive("server.tau", s.tau)
  # Server re-orthogonalization changes the factors' basis every round; the moments would stay
  # in the old one.
  rules.check(not (config.method.reorthogonalize and s.optimizer != "fedavg"),
              "server.optimizer", s.optimizer,
              "must be fedavg with method.reorthogonalize=True (the optimizer's moments do not "
              "follow the change of basis)")
  rules.check(not (config.method.reorthogonalize and config.fl.scaffold), "fl.scaffold", True,
              "cannot run with method.reorthogonalize=True (the control variates do not follow "
              "the change of basis)")
  # The osfa / tsfa controllers price the factor upload only, not SCAFFOLD's control delta.
  rules.check(not (config.fl.scaffold and config.controller.name != "fixed"), "fl.scaffold",
              True, f"needs controller.name=fixed, not {config.controller.name} (the latency "
              "controller does not price the control-variate upload)")


def _validate_rule(config: ml_collections.ConfigDict) -> None:
  """An aggregation rule other than fedit runs with dense uploads, without re-orthogonalization
  or SCAFFOLD; a re-factorizing one without a server optimizer; hetlora, and only hetlora, with
  client ranks, and not under tsfa."""
  rule, m = config.method.rule, config.method
  rules.choice("method.rule", rule, choices.AGGREGATION_RULES)
  ranks = client_ranks(config)
  rules.check(bool(ranks) == (rule == "hetlora"), "method.client_ranks", m.client_ranks,
              "must be a comma list of client ranks with method.rule = 'hetlora' (e.g. "
              f"'2,4,{config.lora.rank}'), and '' with any other rule (it is {rule!r})")
  if rule == "fedit":
    return
  clashes = [("method.name", m.name, m.name != "dense", "dense"),
             # TSFA picks the rank; HetLoRA's client ranks are given.
             ("controller.name", config.controller.name,
              rule == "hetlora" and config.controller.name == "tsfa", "fixed or osfa"),
             ("method.reorthogonalize", m.reorthogonalize, m.reorthogonalize, "False"),
             ("fl.scaffold", config.fl.scaffold, config.fl.scaffold, "False"),
             ("server.optimizer", config.server.optimizer,
              rule in ("fedsvd", "flexlora", "fedsa", "fedex", "flora")
              and config.server.optimizer != "fedavg",
              "fedavg")]
  for field, value, clash, needed in clashes:
    rules.check(not clash, "method.rule", rule,
                f"cannot run with {field}={value} (it needs {field}={needed})")


def _validate_sweep(config: ml_collections.ConfigDict) -> None:
  """Every member of a sweep must itself be a valid config."""
  members = sweep.member_configs(config)
  if len(members) > 1:
    for member in members:
      validate(member)


def _validate_mesh(config: ml_collections.ConfigDict) -> None:
  """The rules that need no device; `validate_mesh_devices` checks the device count."""
  m = config.mesh
  rules.integer("mesh.devices", m.devices, 0, what=" (0 = every device, 1 = no mesh)")
  rules.boolean("mesh.shard_data", m.shard_data)
  rules.boolean("mesh.distributed", m.distributed)
  if m.shard_data:
    rules.check(m.devices != 1, "mesh.shard_data", m.shard_data,
                "needs a mesh of several devices (mesh.devices = 0 or > 1)")
    rules.check(not sweep.is_sweep(config), "mesh.shard_data", m.shard_data,
                "must be False with a sweep (a sweep's mesh splits the members, not the data)")
  rules.check(isinstance(m.coordinator_address, str), "mesh.coordinator_address",
              m.coordinator_address, "must be 'host:port' or '' (detect)")
  rules.integer("mesh.num_processes", m.num_processes, 0, what=" (0 = detect)")
  rules.integer("mesh.process_id", m.process_id, -1, what=" (-1 = detect)")
  if m.num_processes:
    rules.check(m.process_id < m.num_processes, "mesh.process_id", m.process_id,
                f"must be below mesh.num_processes ({m.num_processes})")
  # Every process would hold and update its own copy of the host store; not supported yet.
  rules.check(not (m.distributed and config.fl.client_store == "host"), "fl.client_store",
              "host", "must be device with mesh.distributed = True (a multi-process run keeps "
              "per-client state on the devices)")
  if m.distributed:
    rules.check(m.devices == 0, "mesh.devices", m.devices,
                "must be 0 (every device of every process) with mesh.distributed = True")


def validate_mesh_devices(config: ml_collections.ConfigDict, device_count: int,
                          members: int = 1) -> None:
  """The mesh rules that need the device count (after jax.distributed.initialize)."""
  m = config.mesh
  rules.check(m.devices <= device_count, "mesh.devices", m.devices,
              f"must be at most the {device_count} devices JAX sees (0 = all of them)")
  devices = device_count if m.devices == 0 else m.devices
  if members > 1 and devices > 1:
    rules.check(members % devices == 0, "mesh.devices", m.devices,
                f"must divide the sweep's {members} members (each device runs the same number)")


def _validate_method(method: ml_collections.ConfigDict) -> None:
  rules.choice("method.name", method.name, choices.METHODS)
  o = method.keep_ratio
  rules.number("method.keep_ratio", o, 0, 1, open_low=True)
  rules.check(method.name != "dense" or o == 1, "method.keep_ratio", o,
              "must be 1.0 with method.name = 'dense' (dense uploads send everything)")
  rules.number("method.zeta", method.zeta, 0)
  rules.choice("method.penalty", method.penalty, choices.PENALTY_KINDS)
  rules.choice("method.selection", method.selection, choices.SELECTIONS)
  rules.choice("method.score", method.score, choices.SCORE_KINDS)
  rules.choice("method.aggregation", method.aggregation, choices.AGGREGATIONS)
  rules.boolean("method.error_feedback", method.error_feedback)
  rules.boolean("method.rlora_rescale", method.rlora_rescale)
  rules.boolean("method.reorthogonalize", method.reorthogonalize)
  rules.check(not (method.reorthogonalize and method.name == "slora"), "method.reorthogonalize",
              method.reorthogonalize,
              "must be False with method.name = 'slora' (it sends products, not factors)")
  rules.check(method.name != "slora" or method.aggregation == "all", "method.aggregation",
              method.aggregation, "must be 'all' with method.name = 'slora' (it averages products)")


def _validate_wireless(w: ml_collections.ConfigDict) -> None:
  rules.cell(
      dict(radius_m=w.radius_m, min_distance_m=w.min_distance_m, tx_power_dbm=w.tx_power_dbm,
           noise_psd_dbm_hz=w.noise_psd_dbm_hz, bandwidth=w.bandwidth_mhz,
           shadowing_db=w.shadowing_db, device_flops_min=w.device_gflops_min,
           device_flops_max=w.device_gflops_max),
      {**{k: f"wireless.{k}" for k in ("radius_m", "min_distance_m", "tx_power_dbm",
                                       "noise_psd_dbm_hz", "shadowing_db")},
       "bandwidth": "wireless.bandwidth_mhz", "device_flops_min": "wireless.device_gflops_min",
       "device_flops_max": "wireless.device_gflops_max"})
  rules.number("wireless.budget_s", w.budget_s, 0,
               what=" (0 = use wireless.budget_fraction; for no latency limit use "
               "controller.name = 'fixed')")
  rules.positive("wireless.budget_fraction", w.budget_fraction)
  rules.choice("wireless.fading", w.fading, choices.FADING_MODELS)
  rules.number("wireless.burst_p_bad", w.burst_p_bad, 0, 1)
  rules.number("wireless.burst_p_good", w.burst_p_good, 0, 1)
  rules.check(w.burst_p_bad + w.burst_p_good > 0, "wireless.burst_p_good", w.burst_p_good,
              "must be > 0 when wireless.burst_p_bad is 0")
  rules.number("wireless.burst_depth_db", w.burst_depth_db, 0)
  rules.number("wireless.csi_error", w.csi_error, 0, what=" (0 = perfect CSI)")
  rules.number("wireless.dropout", w.dropout, 0, 1, open_high=True)
  rules.choice("wireless.budget_reference", w.budget_reference, choices.BUDGET_REFERENCES)
  rules.integer("wireless.reference_rank", w.reference_rank, 0, what=" (0 = lora.rank)")


def rank_candidates(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """The ranks the TSFA offline stage compares, parsed from controller.rank_candidates."""
  try:
    ranks = tuple(sorted({int(r) for r in str(config.controller.rank_candidates).split(",")
                          if r.strip()}))
  except ValueError:
    ranks = ()
  rules.check(bool(ranks) and ranks[0] >= 1, "controller.rank_candidates",
              config.controller.rank_candidates, "must be a comma list of ranks >= 1, e.g. '1,2,4,8'")
  return ranks


def client_ranks(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """HetLoRA's client ranks, parsed from method.client_ranks in the order given (client k
  trains at the (k mod len)-th); () when the field is empty."""
  raw = str(config.method.client_ranks).strip()
  try:
    ranks = tuple(int(r) for r in raw.split(",") if r.strip())
  except ValueError:
    ranks = ()
  rank = config.lora.rank
  rules.check(not raw or (bool(ranks) and all(1 <= r <= rank for r in ranks)),
              "method.client_ranks", config.method.client_ranks,
              f"must be a comma list of ranks in [1, lora.rank = {rank}], e.g. '2,4,{rank}'")
  return ranks


def _validate_controller(config: ml_collections.ConfigDict) -> None:
  c = config.controller
  rules.choice("controller.name", c.name, choices.CONTROLLER_MODES)
  rules.number("controller.V", c.V, 0)
  rules.choice("controller.solver", c.solver, choices.SOLVERS)
  rank_candidates(config)
  rules.choice("controller.spectrum", c.spectrum, choices.SPECTRA)
  rules.positive("controller.gamma", c.gamma)
  rules.number("controller.lambda_sp", c.lambda_sp, 0)
  rules.choice("controller.sparsification_cost", c.sparsification_cost,
               choices.SPARSIFICATION_COSTS)
  if c.name == "tsfa" and c.sparsification_cost == "in_flight":
    # The in-flight price assumes dropped components wait in a residual; without one they
    # are lost and "dropped" is the right price.
    rules.check(bool(config.method.error_feedback), "controller.sparsification_cost",
                c.sparsification_cost, "assumes error feedback (method.error_feedback is "
                "false); use 'dropped'")
  rules.number("controller.lambda_cov", c.lambda_cov, 0)
  rules.number("controller.quantile", c.quantile, 0, 1)
  rules.integer("controller.pilot_batches", c.pilot_batches, 1)
  if c.name != "fixed":
    # A dense upload has no keep ratio to choose: osfa / tsfa choose its bandwidth split (and
    # tsfa its rank) only.
    rules.check(bool(lora_targets(config)), "controller.name", c.name,
                "needs LoRA targets to sparsify (lora.targets is empty); use 'fixed'")


def validate_against_data(config: ml_collections.ConfigDict, *, num_classes: int,
                          client_sizes: Iterable[int] | None = None,
                          num_federated: int | None = None) -> None:
  """The rules that need the loaded dataset or the partition."""
  rules.integer("pretrain.num_classes", config.pretrain.num_classes, 1, num_classes,
                f" (the dataset has {num_classes} classes)")
  if num_federated is not None:
    rules.check(config.fl.num_clients <= num_federated, "fl.num_clients", config.fl.num_clients,
                f"must be at most the {num_federated} federated training examples")
  if client_sizes is not None:
    smallest = min(client_sizes)
    rules.check(config.fl.batch_size <= smallest, "fl.batch_size", config.fl.batch_size,
                f"must be at most the smallest client's example count ({smallest}); "
                "lower it or use fewer clients")


def validate_against_model(config: ml_collections.ConfigDict, *, image_size: int,
                           patch_size: int, min_adapted_width: int) -> None:
  """The rules that need the architecture: the patch grid and the adapted layers' widths.

  Args:
    config: the run config.
    image_size: the side the model sees (data.image_size, or the data's native side).
    patch_size: the variant's patch size.
    min_adapted_width: min(d_in, d_out) over the adapted matrices; a rank above it adds
      components that cannot be linearly independent.
  """
  field = "data.image_size" if config.data.image_size else "model.variant"
  rules.patch_grid(image_size, patch_size, field, config.data.image_size or config.model.variant,
                   f" of {config.model.variant}; set data.image_size to a multiple of "
                   f"{patch_size}")
  if lora_targets(config):
    rules.integer("lora.rank", config.lora.rank, 1, min_adapted_width,
                  f" (the narrowest adapted layer of {config.model.variant} has width "
                  f"{min_adapted_width})")
