"""Run configuration: the default ConfigDict, the `file.py:arg` parser, and validation.

Every config file in `configs/` starts from `base_config()` and changes what it needs. `validate`
checks every field before anything is traced, so a bad value produces one message naming the
field and what is allowed, never a stack trace from inside jit.
"""

from __future__ import annotations

import ast
import os
from typing import Any, Iterable

import ml_collections

CLIENT_OPTIMIZERS = ("sgd", "momentum", "adam")
LR_SCHEDULES = ("constant", "cosine")
BACKBONE_KINDS = ("pretrain", "random")  # or a path to a ViT .npz checkpoint
PAYLOAD_VALUE_BITS = (16, 32)

# Fields that may differ between a checkpointed run and the command that resumes it: they change
# how long the run goes or what it logs, never the computation of a round that already ran.
RESUMABLE_FIELDS = ("fl.rounds", "eval.every", "checkpoint.every", "checkpoint.keep",
                    "model.cache_dir", "mesh.coordinator_address", "mesh.process_id")


class ConfigError(ValueError):
  """A config value is out of range or inconsistent; the message names the field."""

  def __init__(self, field: str, value: Any, allowed: str):
    self.field = field
    super().__init__(f"config.{field} = {value!r} is invalid: {allowed}")


def base_config() -> ml_collections.ConfigDict:
  """All fields with their defaults; config files override a few of them."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # root of all randomness: device keys fold_in(seed, round), host rngs [seed, stream, round]

  c.data = ml_collections.ConfigDict()
  c.data.name = "fashion_mnist"  # a registered source: fashion_mnist, digits, cifar10, cifar100
  c.data.data_dir = ""  # prepared TFDS data dir; "" = the source's default location
  c.data.image_size = 0  # side the model sees; images are resized on the device; 0 = native
  c.data.pretrain_fraction = 0.5  # share of training images held out for backbone pretraining
  c.data.partition = "shards"  # iid | shards | dirichlet
  c.data.shards_per_client = 2  # label-sorted shards per client (partition=shards)
  c.data.dirichlet_alpha = 0.5  # concentration (partition=dirichlet); smaller = more skewed
  c.data.partition_seed = -1  # seed of the client partition; -1 = the run's seed

  c.model = ml_collections.ConfigDict()
  c.model.variant = "cpu_small"  # tiny | cpu_small | B/16
  c.model.backbone = "pretrain"  # pretrain (self-pretrained, cached) | random | path/to/vit.npz
  # Where self-pretrained backbones are kept ($SOFTJAX_CACHE_DIR overrides the default).
  c.model.cache_dir = os.environ.get("SOFTJAX_CACHE_DIR", "~/.cache/softjax/backbones")

  c.pretrain = ml_collections.ConfigDict()  # central pretraining of the backbone (model.backbone=pretrain)
  c.pretrain.num_classes = 5  # trained on classes 0..num_classes-1 of the held-out images
  c.pretrain.steps = 800
  c.pretrain.batch_size = 64
  c.pretrain.learning_rate = 1e-3  # peak of a warmup-cosine AdamW schedule
  c.pretrain.weight_decay = 1e-4
  c.pretrain.seed = 0

  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 8
  # Adapter scale alpha / rank = 4. With A ~ N(0, 1/d_in), one step on B moves W0 + s B A by
  # about lr * s^2 * r / d_in times a full-weight step: s = 4 at r = 8, d = 128 makes that 1.
  # At s = 1 the adapter barely moved in 80 rounds (|s B A| / |W0| ~ 0.5 %).
  c.lora.alpha = 32.0
  c.lora.targets = "query,value"  # comma list of query,key,value,out,mlp; "" = head only

  c.method = ml_collections.ConfigDict()  # the upload method (ALGORITHM.md 2, 3, 7)
  c.method.name = "dense"  # dense | soft | tlora | rlora | slora
  c.method.keep_ratio = 1.0  # O in (0, 1]: share of components (entries for tlora/rlora) sent
  c.method.zeta = 0.0  # orthogonality penalty weight in the local objective (SOFT: e.g. 0.1)
  c.method.penalty = "offdiag"  # offdiag [choice] | identity (AdaLoRA-style, collapses norms)
  c.method.error_feedback = True  # residuals for soft, tlora, rlora; False is an ablation
  c.method.selection = "per_layer"  # SOFT top-m per layer [choice] | global top-(m L)
  c.method.score = "factors"  # SOFT score of factors + residual [choice] | update
  c.method.aggregation = "all"  # unsent entries count as zero [choice] | senders (their mean)
  c.method.rlora_rescale = False  # RLoRA 1/O rescaling (turns its error feedback off)

  c.fl = ml_collections.ConfigDict()
  c.fl.num_clients = 20  # N
  c.fl.clients_per_round = 5  # K, sampled uniformly without replacement
  c.fl.rounds = 80  # T
  c.fl.local_steps = 5  # E
  c.fl.batch_size = 32  # b
  c.fl.client_optimizer = "sgd"  # sgd | momentum | adam; fresh state every round
  c.fl.client_lr = 0.03  # peak client learning rate
  c.fl.lr_schedule = "cosine"  # constant | cosine: lr decays over rounds to lr_final_fraction
  c.fl.lr_final_fraction = 0.1  # cosine: the last round's lr as a fraction of client_lr
  # lax.map batch over the sampled clients: 1 = sequential in-graph, K = full vmap; 0 = the
  # backend's best (federated.default_parallelism: 1 on a CPU, all of them on a GPU/TPU).
  c.fl.client_parallelism = 0
  c.fl.value_bits = 32  # bits per uploaded value: 32 (float32) or 16 (bfloat16)

  # The simulated uplink (ALGORITHM.md 4). Every run simulates it and reports its latency; only the
  # osfa / tsfa controllers act on it.
  c.wireless = ml_collections.ConfigDict()
  c.wireless.radius_m = 500.0  # clients uniform in the annulus [min_distance_m, radius_m]
  c.wireless.min_distance_m = 50.0
  c.wireless.tx_power_dbm = 23.0  # p
  c.wireless.noise_psd_dbm_hz = -174.0  # N0
  c.wireless.bandwidth_mhz = 20.0  # B_tot, shared by FDMA
  c.wireless.shadowing_db = 0.0  # log-normal shadowing sigma; 0 = off
  # Client compute speed f_k, uniform in [min, max] GFLOP/s, drawn once per client [choice]. At the
  # CPU scale (0.26 GFLOP per training example, 160 examples a round) 2-6 TFLOP/s puts local
  # compute at 7-21 ms next to 14-43 ms for a dense rank-8 upload: the uplink dominates, as in
  # the paper's setting, and a budget of half the dense latency is feasible. See docs/algorithm.md.
  c.wireless.device_gflops_min = 2000.0
  c.wireless.device_gflops_max = 6000.0
  # Robustness (E6, beyond the paper; all off by default).
  c.wireless.fading = "rayleigh"  # rayleigh (independent per round) | bursty (Gilbert-Elliott)
  c.wireless.burst_p_bad = 0.1  # bursty: good -> bad per round
  c.wireless.burst_p_good = 0.3  # bursty: bad -> good per round
  c.wireless.burst_depth_db = 20.0  # bursty: extra attenuation in the bad state
  c.wireless.csi_error = 0.0  # the controller plans with g_hat = g (1 + eps), eps ~ N(0, this^2)
  c.wireless.dropout = 0.0  # probability that a sampled client's upload is lost mid-round
  c.wireless.budget_s = 0.0  # Tbar in seconds; 0 = budget_fraction x the dense reference latency
  c.wireless.budget_fraction = 0.5  # Tbar / (dense upload latency, mean channel, equal split)
  c.wireless.budget_reference = "expected_max"  # expected_max (over sampled sets) | worst client
  c.wireless.reference_rank = 0  # rank of the dense upload the fraction refers to; 0 = lora.rank

  # Who sets the keep ratio and the bandwidth split each round (ALGORITHM.md 5-7).
  c.controller = ml_collections.ConfigDict()
  c.controller.name = "fixed"  # fixed (O = method.keep_ratio, equal split) | osfa | tsfa
  c.controller.V = 1.0  # Lyapunov weight of the sparsification error Phi in P3
  c.controller.solver = "cvx"  # cvx (CVXPY + Clarabel, DPP) | numpy (the exact twin)
  c.controller.rank_candidates = "1,2,4,8,16,32,64"  # tsfa: ranks the offline stage compares
  c.controller.spectrum = "power_law"  # tsfa: power_law | pilot (full-weight pilot gradient)
  c.controller.gamma = 1.0  # power law sigma_i^2 ~ i^-gamma
  c.controller.lambda_sp = 1.0  # J(r) weight of the sparsification error
  c.controller.lambda_cov = 0.1  # J(r) weight of the covariance cost
  c.controller.quantile = 0.5  # client quantile at which mbar is evaluated
  c.controller.pilot_batches = 4  # spectrum=pilot: client batches in the pilot gradient

  # Vmapped sweeps (softjax/sweep.py): comma lists; "" = not swept. Every member shares one
  # compiled round, the backbone and the data.
  c.sweep = ml_collections.ConfigDict()
  c.sweep.zeta = ""  # method.zeta values
  c.sweep.client_lr = ""  # fl.client_lr values
  c.sweep.keep_ratio = ""  # method.keep_ratio values (the fixed controller's O)
  c.sweep.V = ""  # controller.V values
  c.sweep.seed = ""  # seed values (the partition keeps data.partition_seed / the base seed)
  c.sweep.mode = "grid"  # grid (product of the lists) | zip (element by element)

  # Scaling past one device (softjax/mesh.py): a 1-D mesh over the `clients` axis (the sampled
  # clients split across devices), or over the sweep's `members` axis for a sweep.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.devices = 1  # devices in the mesh: 1 = no mesh (one device), 0 = every device JAX sees
  c.mesh.shard_data = False  # split the training set over the devices (each process feeds its own
  #                            clients' examples); False = a copy on every device
  c.mesh.distributed = False  # jax.distributed.initialize() first: multi-host (TPU pods, Slurm)
  # Only where JAX cannot detect the cluster (TPU pods, Slurm and Open MPI are detected):
  c.mesh.coordinator_address = ""  # host:port of process 0; "" = detect ($JAX_COORDINATOR_ADDRESS)
  c.mesh.num_processes = 0  # processes in the job; 0 = detect
  c.mesh.process_id = -1  # this process's index; -1 = detect

  c.eval = ml_collections.ConfigDict()
  c.eval.every = 10  # evaluate every n rounds and always after the last
  c.eval.num_examples = 0  # test examples used; 0 = the whole test split
  c.eval.batch_size = 500

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 5  # save the whole run state every n rounds and after the last
  c.checkpoint.keep = 2  # keep the newest n checkpoints
  return c


def load(spec: str, root: str | None = None) -> ml_collections.ConfigDict:
  """The config a launcher's `--config=FILE.py:arg` would give, for notebooks and scripts.

  Args:
    spec: `path/to/config.py` or `path/to/config.py:arg`, relative to `root`.
    root: the directory relative paths start from (default: the repository of this package).
  """
  import importlib.util

  path, _, arg = spec.partition(":")
  root = root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  full = path if os.path.isabs(path) else os.path.join(root, path)
  if not os.path.exists(full):
    raise FileNotFoundError(f"config file {full} does not exist")
  module_spec = importlib.util.spec_from_file_location(
      os.path.splitext(os.path.basename(full))[0], full)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses a config-file argument `key=value,flag` into a ConfigDict of typed values.

  `configs/quickstart.py:rounds=3,runlocal` passes "rounds=3,runlocal"; a bare name sets a
  boolean default to True. Values take the type of their default.
  """
  parsed = ml_collections.ConfigDict(defaults)
  for item in filter(None, (s.strip() for s in (arg or "").split(","))):
    key, _, raw = item.partition("=")
    if key not in defaults:
      raise ConfigError(f"<arg>.{key}", item, f"known arguments are {sorted(defaults)}")
    default = defaults[key]
    if not raw:
      value = True
    elif isinstance(default, str):
      value = raw
    else:
      value = type(default)(ast.literal_eval(raw))
    parsed[key] = value
  return parsed


def partition_seed(config: ml_collections.ConfigDict) -> int:
  """The seed of the client partition: data.partition_seed, or the run's seed when it is -1."""
  return config.seed if config.data.partition_seed < 0 else config.data.partition_seed


def lora_targets(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The adapted projections named by config.lora.targets."""
  return tuple(t.strip() for t in config.lora.targets.split(",") if t.strip())


def _check(ok: bool, field: str, value: Any, allowed: str) -> None:
  if not ok:
    raise ConfigError(field, value, allowed)


def _check_choice(field: str, value: Any, choices: Iterable[str]) -> None:
  choices = tuple(choices)
  _check(value in choices, field, value, f"must be one of {', '.join(choices)}")


def _check_int(field: str, value: Any, low: int, high: int | None = None, what: str = "") -> None:
  ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
  ok = ok and (high is None or value <= high)
  bound = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
  _check(ok, field, value, f"must be {bound}{what}")


def _check_positive(field: str, value: Any) -> None:
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
  _check(ok, field, value, "must be a number > 0")


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every field that does not need the data; raises ConfigError on the first bad one."""
  from softjax.data import partition as partition_lib
  from softjax.data import sources
  from softjax.models import vit

  _check_int("seed", config.seed, 0)
  _check_choice("data.name", config.data.name, sources.available_sources())
  f = config.data.pretrain_fraction
  _check(isinstance(f, (int, float)) and 0 <= f < 1, "data.pretrain_fraction", f,
         "must be in [0, 1)")
  _check_int("data.image_size", config.data.image_size, 0, what=" (0 = native size)")
  _check_choice("data.partition", config.data.partition, partition_lib.PARTITIONS)
  _check_int("data.shards_per_client", config.data.shards_per_client, 1)
  _check_positive("data.dirichlet_alpha", config.data.dirichlet_alpha)
  _check_int("data.partition_seed", config.data.partition_seed, -1, what=" (-1 = seed)")

  _check_choice("model.variant", config.model.variant, vit.VARIANTS)
  backbone = config.model.backbone
  _check(backbone in BACKBONE_KINDS or str(backbone).endswith(".npz"), "model.backbone",
         backbone, f"must be one of {', '.join(BACKBONE_KINDS)} or a path to a .npz checkpoint")
  if backbone == "pretrain":
    _check(f > 0, "data.pretrain_fraction", f,
           "must be > 0 when model.backbone = 'pretrain' (the backbone needs held-out images)")
  _check_int("pretrain.num_classes", config.pretrain.num_classes, 1)
  _check_int("pretrain.steps", config.pretrain.steps, 1)
  _check_int("pretrain.batch_size", config.pretrain.batch_size, 1)
  _check_positive("pretrain.learning_rate", config.pretrain.learning_rate)
  _check(config.pretrain.weight_decay >= 0, "pretrain.weight_decay",
         config.pretrain.weight_decay, "must be >= 0")

  _check_int("lora.rank", config.lora.rank, 1)
  _check_positive("lora.alpha", config.lora.alpha)
  for target in lora_targets(config):
    _check_choice("lora.targets", target, vit.LORA_TARGETS)

  _validate_method(config.method)
  fl = config.fl
  _check_int("fl.num_clients", fl.num_clients, 1)
  _check_int("fl.clients_per_round", fl.clients_per_round, 1, fl.num_clients,
             " (at most fl.num_clients)")
  _check_int("fl.rounds", fl.rounds, 1)
  _check_int("fl.local_steps", fl.local_steps, 1)
  _check_int("fl.batch_size", fl.batch_size, 1)
  _check_choice("fl.client_optimizer", fl.client_optimizer, CLIENT_OPTIMIZERS)
  _check_positive("fl.client_lr", fl.client_lr)
  _check_choice("fl.lr_schedule", fl.lr_schedule, LR_SCHEDULES)
  f = fl.lr_final_fraction
  _check(isinstance(f, (int, float)) and 0 <= f <= 1, "fl.lr_final_fraction", f,
         "must be in [0, 1]")
  _check_int("fl.client_parallelism", fl.client_parallelism, 0, fl.clients_per_round,
             " (at most fl.clients_per_round; 0 = the backend's best)")
  _check(fl.value_bits in PAYLOAD_VALUE_BITS, "fl.value_bits", fl.value_bits,
         f"must be one of {PAYLOAD_VALUE_BITS}")

  _validate_wireless(config.wireless)
  _validate_controller(config)

  _validate_mesh(config)

  _check_int("eval.every", config.eval.every, 1)
  _check_int("eval.num_examples", config.eval.num_examples, 0, what=" (0 = whole test split)")
  _check_int("eval.batch_size", config.eval.batch_size, 1)
  _check_int("checkpoint.every", config.checkpoint.every, 1)
  _check_int("checkpoint.keep", config.checkpoint.keep, 1)
  _validate_sweep(config)


def _validate_sweep(config: ml_collections.ConfigDict) -> None:
  """Every member of a sweep must itself be a valid config."""
  from softjax import sweep

  members = sweep.member_configs(config)
  if len(members) > 1:
    for member in members:
      validate(member)


def _validate_mesh(config: ml_collections.ConfigDict) -> None:
  """The rules that need no device; `validate_mesh_devices` checks the device count."""
  from softjax import sweep

  m = config.mesh
  _check_int("mesh.devices", m.devices, 0, what=" (0 = every device, 1 = no mesh)")
  _check(isinstance(m.shard_data, bool), "mesh.shard_data", m.shard_data, "must be True or False")
  _check(isinstance(m.distributed, bool), "mesh.distributed", m.distributed,
         "must be True or False")
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
  from softjax import soft
  from softjax import sparsifiers

  _check_choice("method.name", method.name, sparsifiers.METHODS)
  o = method.keep_ratio
  _check(isinstance(o, (int, float)) and 0 < o <= 1, "method.keep_ratio", o, "must be in (0, 1]")
  _check(method.name != "dense" or o == 1, "method.keep_ratio", o,
         "must be 1.0 with method.name = 'dense' (dense uploads send everything)")
  _check(isinstance(method.zeta, (int, float)) and method.zeta >= 0, "method.zeta", method.zeta,
         "must be a number >= 0")
  _check_choice("method.penalty", method.penalty, soft.PENALTY_KINDS)
  _check_choice("method.selection", method.selection, soft.SELECTIONS)
  _check_choice("method.score", method.score, soft.SCORE_KINDS)
  _check_choice("method.aggregation", method.aggregation, sparsifiers.AGGREGATIONS)
  _check(method.name != "slora" or method.aggregation == "all", "method.aggregation",
         method.aggregation, "must be 'all' with method.name = 'slora' (it averages products)")


def _validate_wireless(w: ml_collections.ConfigDict) -> None:
  from softjax import wireless

  _check_positive("wireless.radius_m", w.radius_m)
  _check_positive("wireless.min_distance_m", w.min_distance_m)
  _check(w.min_distance_m < w.radius_m, "wireless.min_distance_m", w.min_distance_m,
         f"must be below wireless.radius_m ({w.radius_m})")
  _check_positive("wireless.bandwidth_mhz", w.bandwidth_mhz)
  _check(isinstance(w.shadowing_db, (int, float)) and w.shadowing_db >= 0,
         "wireless.shadowing_db", w.shadowing_db, "must be >= 0 (0 = off)")
  _check_positive("wireless.device_gflops_min", w.device_gflops_min)
  _check(isinstance(w.device_gflops_max, (int, float)) and
         w.device_gflops_max >= w.device_gflops_min, "wireless.device_gflops_max",
         w.device_gflops_max, f"must be >= wireless.device_gflops_min ({w.device_gflops_min})")
  _check(isinstance(w.budget_s, (int, float)) and w.budget_s >= 0, "wireless.budget_s",
         w.budget_s, "must be >= 0 (0 = use wireless.budget_fraction)")
  _check_positive("wireless.budget_fraction", w.budget_fraction)
  _check_choice("wireless.fading", w.fading, FADING_MODELS)
  for name in ("burst_p_bad", "burst_p_good"):
    _check(isinstance(w[name], (int, float)) and 0 <= w[name] <= 1, f"wireless.{name}",
           w[name], "must be in [0, 1]")
  _check(w.burst_p_bad + w.burst_p_good > 0, "wireless.burst_p_good", w.burst_p_good,
         "must be > 0 when wireless.burst_p_bad is 0")
  _check(isinstance(w.burst_depth_db, (int, float)) and w.burst_depth_db >= 0,
         "wireless.burst_depth_db", w.burst_depth_db, "must be >= 0")
  _check(isinstance(w.csi_error, (int, float)) and w.csi_error >= 0, "wireless.csi_error",
         w.csi_error, "must be >= 0 (0 = perfect CSI)")
  _check(isinstance(w.dropout, (int, float)) and 0 <= w.dropout < 1, "wireless.dropout",
         w.dropout, "must be in [0, 1)")
  _check_choice("wireless.budget_reference", w.budget_reference,
                wireless.DENSE_BUDGET_REFERENCES)
  _check_int("wireless.reference_rank", w.reference_rank, 0, what=" (0 = lora.rank)")


FADING_MODELS = ("rayleigh", "bursty")
SPECTRA = ("power_law", "pilot")


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
  from softjax import controller
  from softjax import tsfa

  c = config.controller
  _check_choice("controller.name", c.name, controller.MODES)
  _check(isinstance(c.V, (int, float)) and c.V >= 0, "controller.V", c.V, "must be >= 0")
  _check_choice("controller.solver", c.solver, tsfa.SOLVERS)
  rank_candidates(config)
  _check_choice("controller.spectrum", c.spectrum, SPECTRA)
  _check(isinstance(c.gamma, (int, float)) and c.gamma > 0, "controller.gamma", c.gamma,
         "must be > 0")
  for name in ("lambda_sp", "lambda_cov"):
    _check(isinstance(c[name], (int, float)) and c[name] >= 0, f"controller.{name}", c[name],
           "must be >= 0")
  _check(isinstance(c.quantile, (int, float)) and 0 <= c.quantile <= 1, "controller.quantile",
         c.quantile, "must be in [0, 1]")
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


def flat_items(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  """{'fl.rounds': 30, ...}: the leaves of a (nested) ConfigDict or dict."""
  items = {}
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      items.update(flat_items(value, name + "."))
    else:
      items[name] = value
  return items


def resume_conflicts(saved: dict[str, Any], current: ml_collections.ConfigDict) -> list[str]:
  """Fields whose value differs from the checkpointed run's, except RESUMABLE_FIELDS.

  A field the checkpoint does not have (it was added to softjax after the run started) is not a
  conflict while it holds its default: every new field's default keeps the earlier behaviour.
  """
  now = flat_items(current)
  before = flat_items(saved)
  defaults = flat_items(base_config())
  keys = sorted(set(now) | set(before))
  return [f"{k}: checkpoint has {before.get(k)!r}, command has {now.get(k)!r}" for k in keys
          if k not in RESUMABLE_FIELDS and before.get(k) != now.get(k)
          and not (k not in before and k in defaults and now.get(k) == defaults[k])]
