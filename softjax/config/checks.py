"""Validation of a run config: one message naming the field and what is allowed.

`validate` checks every field before anything is traced; `validate_against_data` and
`validate_against_model` check the rules that need the loaded dataset or the architecture, and
`validate_mesh_devices` the ones that need the device count. Each range rule is written here
once; every number must be finite (a NaN or an infinity is never a meaningful setting).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import ml_collections

from softjax.config import choices, sweep
from softjax.config.defaults import lora_targets, metrics_writers
from softjax.errors import ConfigError


def _check(ok: bool, field: str, value: Any, allowed: str) -> None:
  if not ok:
    raise ConfigError(field, value, allowed)


def _check_choice(field: str, value: Any, allowed: Iterable[str]) -> None:
  allowed = tuple(allowed)
  _check(value in allowed, field, value, f"must be one of {', '.join(map(str, allowed))}")


def _check_bool(field: str, value: Any) -> None:
  _check(isinstance(value, bool), field, value, "must be True or False")


def _check_int(field: str, value: Any, low: int, high: int | None = None, what: str = "") -> None:
  ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
  ok = ok and (high is None or value <= high)
  bound = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
  _check(ok, field, value, f"must be {bound}{what}")


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_number(field: str, value: Any, low: float | None = None, high: float | None = None,
                  *, open_low: bool = False, open_high: bool = False, what: str = "") -> None:
  """A finite number in the interval given by low/high (closed unless open_*)."""
  ok = _is_number(value)
  ok = ok and (low is None or (value > low if open_low else value >= low))
  ok = ok and (high is None or (value < high if open_high else value <= high))
  if low is not None and high is not None:
    bound = f"in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
  elif low is not None:
    bound = f"{'>' if open_low else '>='} {low}"
  elif high is not None:
    bound = f"{'<' if open_high else '<='} {high}"
  else:
    bound = ""
  _check(ok, field, value, f"must be a finite number {bound}{what}".rstrip())


def _check_positive(field: str, value: Any, what: str = "") -> None:
  _check_number(field, value, 0, open_low=True, what=what)


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every field that does not need the data; raises ConfigError on the first bad one."""
  _check_int("seed", config.seed, 0)
  _validate_data(config)
  _validate_model(config)
  _validate_method(config.method)
  _validate_fl(config.fl)
  _validate_wireless(config.wireless)
  _validate_controller(config)
  _validate_mesh(config)
  _check_int("eval.every", config.eval.every, 1)
  _check_int("eval.num_examples", config.eval.num_examples, 0, what=" (0 = whole test split)")
  _check_int("eval.batch_size", config.eval.batch_size, 1)
  _check_int("checkpoint.every", config.checkpoint.every, 1)
  _check_int("checkpoint.keep", config.checkpoint.keep, 1)
  for writer in metrics_writers(config):
    _check_choice("metrics.writers", writer, choices.METRICS_WRITERS)
  _check(isinstance(config.metrics.wandb_project, str) and config.metrics.wandb_project,
         "metrics.wandb_project", config.metrics.wandb_project, "must be a project name")
  _validate_sweep(config)


def _validate_data(config: ml_collections.ConfigDict) -> None:
  d = config.data
  _check_choice("data.name", d.name, choices.DATA_SOURCES)
  _check(isinstance(d.data_dir, str), "data.data_dir", d.data_dir,
         "must be a directory path or '' (the source's default location)")
  _check_number("data.pretrain_fraction", d.pretrain_fraction, 0, 1, open_high=True)
  _check_int("data.image_size", d.image_size, 0, what=" (0 = native size)")
  _check_choice("data.partition", d.partition, choices.PARTITIONS)
  _check_int("data.shards_per_client", d.shards_per_client, 1)
  _check_positive("data.dirichlet_alpha", d.dirichlet_alpha)
  _check_int("data.partition_seed", d.partition_seed, -1, what=" (-1 = seed)")


def _validate_model(config: ml_collections.ConfigDict) -> None:
  _check_choice("model.variant", config.model.variant, choices.MODEL_VARIANTS)
  backbone = config.model.backbone
  _check(backbone in choices.BACKBONE_KINDS or str(backbone).endswith(".npz"), "model.backbone",
         backbone,
         f"must be one of {', '.join(choices.BACKBONE_KINDS)} or a path to a .npz checkpoint")
  if backbone == "pretrain":
    _check(config.data.pretrain_fraction > 0, "data.pretrain_fraction",
           config.data.pretrain_fraction,
           "must be > 0 when model.backbone = 'pretrain' (the backbone needs held-out images)")
  p = config.pretrain
  _check_int("pretrain.num_classes", p.num_classes, 1)
  _check_int("pretrain.steps", p.steps, 1)
  _check_int("pretrain.batch_size", p.batch_size, 1)
  _check_positive("pretrain.learning_rate", p.learning_rate)
  _check_number("pretrain.weight_decay", p.weight_decay, 0)
  _check_int("lora.rank", config.lora.rank, 1)
  _check_positive("lora.alpha", config.lora.alpha)
  targets = lora_targets(config)
  for target in targets:
    _check_choice("lora.targets", target, choices.LORA_TARGETS)
  _check(len(set(targets)) == len(targets), "lora.targets", config.lora.targets,
         "names a projection twice")


def _validate_fl(fl: ml_collections.ConfigDict) -> None:
  _check_int("fl.num_clients", fl.num_clients, 1)
  _check_int("fl.clients_per_round", fl.clients_per_round, 1, fl.num_clients,
             " (at most fl.num_clients)")
  _check_int("fl.rounds", fl.rounds, 1)
  _check_int("fl.local_steps", fl.local_steps, 1)
  _check_int("fl.batch_size", fl.batch_size, 1)
  _check_choice("fl.client_optimizer", fl.client_optimizer, choices.CLIENT_OPTIMIZERS)
  _check_positive("fl.client_lr", fl.client_lr)
  _check_choice("fl.lr_schedule", fl.lr_schedule, choices.LR_SCHEDULES)
  _check_number("fl.lr_final_fraction", fl.lr_final_fraction, 0, 1)
  _check_int("fl.client_parallelism", fl.client_parallelism, 0, fl.clients_per_round,
             " (at most fl.clients_per_round; 0 = the backend's best)")
  _check_choice("fl.value_bits", fl.value_bits, choices.PAYLOAD_VALUE_BITS)


def _validate_sweep(config: ml_collections.ConfigDict) -> None:
  """Every member of a sweep must itself be a valid config."""
  members = sweep.member_configs(config)
  if len(members) > 1:
    for member in members:
      validate(member)


def _validate_mesh(config: ml_collections.ConfigDict) -> None:
  """The rules that need no device; `validate_mesh_devices` checks the device count."""
  m = config.mesh
  _check_int("mesh.devices", m.devices, 0, what=" (0 = every device, 1 = no mesh)")
  _check_bool("mesh.shard_data", m.shard_data)
  _check_bool("mesh.distributed", m.distributed)
  if m.shard_data:
    _check(m.devices != 1, "mesh.shard_data", m.shard_data,
           "needs a mesh of several devices (mesh.devices = 0 or > 1)")
    _check(not sweep.is_sweep(config), "mesh.shard_data", m.shard_data,
           "must be False with a sweep (a sweep's mesh splits the members, not the data)")
  _check(isinstance(m.coordinator_address, str), "mesh.coordinator_address",
         m.coordinator_address, "must be 'host:port' or '' (detect)")
  _check_int("mesh.num_processes", m.num_processes, 0, what=" (0 = detect)")
  _check_int("mesh.process_id", m.process_id, -1, what=" (-1 = detect)")
  if m.num_processes:
    _check(m.process_id < m.num_processes, "mesh.process_id", m.process_id,
           f"must be below mesh.num_processes ({m.num_processes})")
  if m.distributed:
    _check(m.devices == 0, "mesh.devices", m.devices,
           "must be 0 (every device of every process) with mesh.distributed = True")


def validate_mesh_devices(config: ml_collections.ConfigDict, device_count: int,
                          members: int = 1) -> None:
  """The mesh rules that need the device count (after jax.distributed.initialize)."""
  m = config.mesh
  _check(m.devices <= device_count, "mesh.devices", m.devices,
         f"must be at most the {device_count} devices JAX sees (0 = all of them)")
  devices = device_count if m.devices == 0 else m.devices
  if members > 1 and devices > 1:
    _check(members % devices == 0, "mesh.devices", m.devices,
           f"must divide the sweep's {members} members (each device runs the same number)")


def _validate_method(method: ml_collections.ConfigDict) -> None:
  _check_choice("method.name", method.name, choices.METHODS)
  o = method.keep_ratio
  _check_number("method.keep_ratio", o, 0, 1, open_low=True)
  _check(method.name != "dense" or o == 1, "method.keep_ratio", o,
         "must be 1.0 with method.name = 'dense' (dense uploads send everything)")
  _check_number("method.zeta", method.zeta, 0)
  _check_choice("method.penalty", method.penalty, choices.PENALTY_KINDS)
  _check_choice("method.selection", method.selection, choices.SELECTIONS)
  _check_choice("method.score", method.score, choices.SCORE_KINDS)
  _check_choice("method.aggregation", method.aggregation, choices.AGGREGATIONS)
  _check_bool("method.error_feedback", method.error_feedback)
  _check_bool("method.rlora_rescale", method.rlora_rescale)
  _check(method.name != "slora" or method.aggregation == "all", "method.aggregation",
         method.aggregation, "must be 'all' with method.name = 'slora' (it averages products)")


def _validate_wireless(w: ml_collections.ConfigDict) -> None:
  _check_positive("wireless.radius_m", w.radius_m)
  _check_positive("wireless.min_distance_m", w.min_distance_m)
  _check(w.min_distance_m < w.radius_m, "wireless.min_distance_m", w.min_distance_m,
         f"must be below wireless.radius_m ({w.radius_m})")
  # Physical ranges, wide enough for any cell: 0.1 uW to 1 kW of transmit power; a noise PSD
  # around the thermal -174 dBm/Hz (at 290 K), anything above -100 dBm/Hz is no receiver.
  _check_number("wireless.tx_power_dbm", w.tx_power_dbm, -40, 60, what=" dBm")
  _check_number("wireless.noise_psd_dbm_hz", w.noise_psd_dbm_hz, -220, -100,
                what=" dBm/Hz (thermal noise at 290 K is -174)")
  _check_positive("wireless.bandwidth_mhz", w.bandwidth_mhz)
  _check_number("wireless.shadowing_db", w.shadowing_db, 0, what=" (0 = off)")
  _check_positive("wireless.device_gflops_min", w.device_gflops_min)
  _check_number("wireless.device_gflops_max", w.device_gflops_max, w.device_gflops_min,
                what=" (>= wireless.device_gflops_min)")
  _check_number("wireless.budget_s", w.budget_s, 0,
                what=" (0 = use wireless.budget_fraction; for no latency limit use "
                "controller.name = 'fixed')")
  _check_positive("wireless.budget_fraction", w.budget_fraction)
  _check_choice("wireless.fading", w.fading, choices.FADING_MODELS)
  _check_number("wireless.burst_p_bad", w.burst_p_bad, 0, 1)
  _check_number("wireless.burst_p_good", w.burst_p_good, 0, 1)
  _check(w.burst_p_bad + w.burst_p_good > 0, "wireless.burst_p_good", w.burst_p_good,
         "must be > 0 when wireless.burst_p_bad is 0")
  _check_number("wireless.burst_depth_db", w.burst_depth_db, 0)
  _check_number("wireless.csi_error", w.csi_error, 0, what=" (0 = perfect CSI)")
  _check_number("wireless.dropout", w.dropout, 0, 1, open_high=True)
  _check_choice("wireless.budget_reference", w.budget_reference, choices.BUDGET_REFERENCES)
  _check_int("wireless.reference_rank", w.reference_rank, 0, what=" (0 = lora.rank)")


def rank_candidates(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """The ranks the TSFA offline stage compares, parsed from controller.rank_candidates."""
  try:
    ranks = tuple(sorted({int(r) for r in str(config.controller.rank_candidates).split(",")
                          if r.strip()}))
  except ValueError:
    ranks = ()
  _check(bool(ranks) and ranks[0] >= 1, "controller.rank_candidates",
         config.controller.rank_candidates, "must be a comma list of ranks >= 1, e.g. '1,2,4,8'")
  return ranks


def _validate_controller(config: ml_collections.ConfigDict) -> None:
  c = config.controller
  _check_choice("controller.name", c.name, choices.CONTROLLER_MODES)
  _check_number("controller.V", c.V, 0)
  _check_choice("controller.solver", c.solver, choices.SOLVERS)
  rank_candidates(config)
  _check_choice("controller.spectrum", c.spectrum, choices.SPECTRA)
  _check_positive("controller.gamma", c.gamma)
  _check_number("controller.lambda_sp", c.lambda_sp, 0)
  _check_number("controller.lambda_cov", c.lambda_cov, 0)
  _check_number("controller.quantile", c.quantile, 0, 1)
  _check_int("controller.pilot_batches", c.pilot_batches, 1)
  if c.name != "fixed":
    _check(config.method.name != "dense", "controller.name", c.name,
           "must be 'fixed' with method.name = 'dense' (a dense upload has nothing to choose)")
    _check(bool(lora_targets(config)), "controller.name", c.name,
           "needs LoRA targets to sparsify (lora.targets is empty); use 'fixed'")


def validate_against_data(config: ml_collections.ConfigDict, *, num_classes: int,
                          client_sizes: Iterable[int] | None = None,
                          num_federated: int | None = None) -> None:
  """The rules that need the loaded dataset or the partition."""
  _check_int("pretrain.num_classes", config.pretrain.num_classes, 1, num_classes,
             f" (the dataset has {num_classes} classes)")
  if num_federated is not None:
    _check(config.fl.num_clients <= num_federated, "fl.num_clients", config.fl.num_clients,
           f"must be at most the {num_federated} federated training examples")
  if client_sizes is not None:
    smallest = min(client_sizes)
    _check(config.fl.batch_size <= smallest, "fl.batch_size", config.fl.batch_size,
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
  _check(image_size % patch_size == 0, field,
         config.data.image_size or config.model.variant,
         f"gives {image_size}x{image_size} images, not a multiple of the "
         f"{config.model.variant} patch size {patch_size}; set data.image_size to a multiple of "
         f"{patch_size}")
  if lora_targets(config):
    _check_int("lora.rank", config.lora.rank, 1, min_adapted_width,
               f" (the narrowest adapted layer of {config.model.variant} has width "
               f"{min_adapted_width})")
