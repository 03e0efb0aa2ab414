"""The allowed values of every config field that names a choice.

The library's own modules take their lists from here (config imports nothing from the library),
so a choice is added in one place. Registries keyed by name (data sources, ViT variants) are
checked against these lists by the tests.
"""

CLIENT_OPTIMIZERS = ("sgd", "momentum", "adam")
CLIENT_STORES = ("device", "host")  # where per-client state lives (federated/client_store.py)
# federated/server_opt.py
SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadagrad", "fedyogi", "fedadam")
LR_SCHEDULES = ("constant", "cosine")
BACKBONE_KINDS = ("pretrain", "random")  # or a path to a ViT .npz checkpoint
PAYLOAD_VALUE_BITS = (16, 32)

DATA_SOURCES = ("cifar10", "cifar100", "digits", "fashion_mnist")  # data.sources registry
PARTITIONS = ("iid", "shards", "dirichlet")
MODEL_VARIANTS = ("tiny", "cpu_small", "cpu_fast", "B/16")  # models.vit.VARIANTS
# "query"/"key"/"value"/"out" are the attention projections; "mlp" adapts both MLP Dense layers.
LORA_TARGETS = ("query", "key", "value", "out", "mlp")

METHODS = ("dense", "soft", "tlora", "rlora", "slora")
# Federated-LoRA aggregation rules a run can select (federated/lora_rules.py); fedit is the
# separate averaging every method uses.
AGGREGATION_RULES = ("fedit", "ffa", "fedsa", "fedex", "flora", "rolora", "fedsvd", "flexlora",
                     "hetlora")
AGGREGATIONS = ("all", "senders")  # ALGORITHM.md 3: missing components count as zero [choice]
ERROR_FEEDBACK_METHODS = ("soft", "tlora", "rlora")
PENALTY_KINDS = ("offdiag", "identity", "normalized")
SCORE_KINDS = ("factors", "update")
SELECTIONS = ("per_layer", "global")

FADING_MODELS = ("rayleigh", "bursty")
BUDGET_REFERENCES = ("expected_max", "worst")

CONTROLLER_MODES = ("fixed", "osfa", "tsfa")
SOLVERS = ("cvx", "numpy")  # where the solver fallback chain starts
SPECTRA = ("power_law", "pilot")
# J(r)'s price of a dropped component: all of it, or what error feedback leaves undelivered.
SPARSIFICATION_COSTS = ("dropped", "in_flight")

SWEEP_MODES = ("grid", "zip")

METRICS_WRITERS = ("tensorboard", "wandb")  # besides metrics.jsonl, which is always written
