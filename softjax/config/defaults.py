"""The default run config: every field with its default and one comment.

Every config file in `configs/` starts from `base_config()` and changes what it needs.
"""

from __future__ import annotations

import os

import ml_collections

# Fields that may differ between a checkpointed run and the command that resumes it: they change
# how long the run goes, what it logs or where per-client state is kept (fl.client_store: the
# same rows, up to float32 rounding under re-orthogonalization), never what a round computes.
RESUMABLE_FIELDS = ("fl.rounds", "fl.client_store", "eval.every", "eval.final_full",
                    "checkpoint.every", "checkpoint.keep", "model.cache_dir", "mesh.coordinator_address", "mesh.process_id",
                    "metrics.writers", "metrics.wandb_project")


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
  #   | normalized (offdiag(G)^2 / ||G||^2: the same pull on small factors as on large ones)
  c.method.reorthogonalize = False  # server re-orthogonalizes B, A after aggregating, BA kept
  c.method.error_feedback = True  # residuals for soft, tlora, rlora; False is an ablation
  c.method.selection = "per_layer"  # SOFT top-m per layer [choice] | global top-(m L)
  c.method.score = "factors"  # SOFT score of factors + residual [choice] | update
  c.method.aggregation = "all"  # unsent entries count as zero [choice] | senders (their mean)
  c.method.rlora_rescale = False  # RLoRA 1/O rescaling (turns its error feedback off)
  # Federated-LoRA aggregation rule (docs/algorithm.md 5): fedit (separate averaging) | ffa (A
  # frozen) | fedsa (A shared, B per client) | fedex (fedit + the residual folded into the
  # frozen weights) | flora (the mean product folded, the adapter restarted) | rolora (B, then A,
  # by round) | fedsvd (A frozen, server SVD) | flexlora (SVD of the mean product) | hetlora
  # (per-client ranks, method.client_ranks); other than fedit: method.name=dense (under osfa /
  # tsfa the controller then splits the band for the rule's payload; hetlora: not tsfa).
  c.method.rule = "fedit"
  # hetlora: comma list of client ranks, each in [1, lora.rank]; client k trains at the
  # (k mod len)-th of them [choice], e.g. "2,4,8"; "" for every other rule.
  c.method.client_ranks = ""

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
  c.fl.prox_mu = 0.0  # FedProx: mu ||w - w_global||^2 / 2 in every client's objective; 0 = off
  c.fl.scaffold = False  # SCAFFOLD control variates (client SGD, fixed controller); N copies
  # Where the N clients' per-client state (residuals, SCAFFOLD's c_k) lives: device (one
  # [N, ...] array per leaf, all on the accelerator) | host (NumPy on the host; each round moves
  # only the K sampled rows to the device: device memory grows with K, not N).
  c.fl.client_store = "device"

  # The server's step on the aggregate (FedOpt; federated/server_opt.py, docs/algorithm.md 6).
  c.server = ml_collections.ConfigDict()
  # fedavg (the aggregate as it is) | fedavgm | fedadagrad | fedyogi | fedadam
  c.server.optimizer = "fedavg"
  c.server.lr = 1.0  # server learning rate (fedavgm: 1.0 with momentum; adaptive: e.g. 0.01-0.1)
  c.server.momentum = 0.9  # fedavgm
  c.server.b1 = 0.9  # first-moment decay (adaptive)
  c.server.b2 = 0.99  # second-moment decay (fedyogi, fedadam)
  c.server.tau = 1e-3  # adaptivity floor: step lr m / (sqrt(v) + tau), v starts at tau^2

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
  # tsfa: dropped (every dropped component is lost) | in_flight (only what error feedback has
  # not delivered by round T is lost; docs/algorithm.md section 2)
  c.controller.sparsification_cost = "dropped"
  c.controller.lambda_cov = 0.1  # J(r) weight of the covariance cost
  c.controller.quantile = 0.5  # client quantile at which mbar is evaluated
  c.controller.pilot_batches = 4  # spectrum=pilot: client batches in the pilot gradient

  # Vmapped sweeps (softjax/config/sweep.py): comma lists; "" = not swept. Every member shares one
  # compiled round, the backbone and the data.
  c.sweep = ml_collections.ConfigDict()
  c.sweep.zeta = ""  # method.zeta values
  c.sweep.client_lr = ""  # fl.client_lr values
  c.sweep.keep_ratio = ""  # method.keep_ratio values (the fixed controller's O)
  c.sweep.V = ""  # controller.V values
  c.sweep.seed = ""  # seed values (the partition keeps data.partition_seed / the base seed)
  c.sweep.mode = "grid"  # grid (product of the lists) | zip (element by element)

  # Scaling past one device (softjax/federated/placement.py): a 1-D mesh over the `clients` axis (the sampled
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
  c.eval.num_examples = 0  # test examples of every evaluation (the first n); 0 = the whole split
  # The last round is also evaluated on the whole split (row field test_accuracy_full); the
  # subset's test_accuracy of that row comes from the same pass, so the curve stays one series.
  c.eval.final_full = True
  c.eval.batch_size = 500

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 5  # save the whole run state every n rounds and after the last
  c.checkpoint.keep = 2  # keep the newest n checkpoints

  # Where the rows go besides metrics.jsonl, the record of truth (softjax/run/writers.py).
  c.metrics = ml_collections.ConfigDict()
  c.metrics.writers = ""  # comma list of tensorboard (tensorboardX, no TensorFlow), wandb
  c.metrics.wandb_project = "softjax"  # wandb: the project the run is logged to
  return c


def partition_seed(config: ml_collections.ConfigDict) -> int:
  """The seed of the client partition: data.partition_seed, or the run's seed when it is -1."""
  return config.seed if config.data.partition_seed < 0 else config.data.partition_seed


def lora_targets(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The adapted projections named by config.lora.targets."""
  return tuple(t.strip() for t in config.lora.targets.split(",") if t.strip())


def metrics_writers(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The extra metrics writers named by config.metrics.writers."""
  return tuple(w.strip() for w in config.metrics.writers.split(",") if w.strip())
