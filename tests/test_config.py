"""Config files load, the arg parser types values, and every validation rule names its field."""

import importlib
import re

import pytest

from softjax import config as config_lib
from tests.support import make_testing_config

CONFIG_MODULES = ("configs.quickstart", "configs.cpu_v1", "configs.testing", "configs.cifar100_vitb16")


@pytest.mark.parametrize("name", CONFIG_MODULES)
def test_config_files_are_valid_and_locked(name):
  config = importlib.import_module(name).get_config()
  config_lib.validate(config)
  with pytest.raises(AttributeError):
    config.fl.not_a_field = 1  # locked: a typo in an override fails loudly


def test_parse_arg_types_values_and_flags():
  args = config_lib.parse_arg("rounds=3,head_only", rounds=30, head_only=False, name="x")
  assert args.rounds == 3 and args.head_only is True and args.name == "x"
  with pytest.raises(config_lib.ConfigFileError, match="'roundz=3' is unknown.* are rounds"):
    config_lib.parse_arg("roundz=3", rounds=30)


@pytest.mark.parametrize("arg, match", [
    ("rounds=abc", "rounds='abc' is invalid: rounds takes an int"),
    ("rounds=2.5", "rounds='2.5' is invalid"),
    ("rounds", "'rounds' needs a value"),
    ("head_only=3", "head_only='3' is invalid: head_only takes a bool"),
])
def test_parse_arg_refuses_malformed_values_with_one_line(arg, match):
  with pytest.raises(config_lib.ConfigFileError, match=match):
    config_lib.parse_arg(arg, rounds=30, head_only=False)


def test_load_names_a_missing_config_file(tmp_path):
  with pytest.raises(config_lib.ConfigFileError, match="nothere.py does not exist"):
    config_lib.load(str(tmp_path / "nothere.py"))
  assert config_lib.load("configs/testing.py:rounds=2").fl.rounds == 2


def test_quickstart_arguments():
  from configs import quickstart
  config = quickstart.get_config("rounds=7,head_only")
  assert config.fl.rounds == 7 and config.lora.targets == ""
  central, federated = quickstart.get_config("centralized"), quickstart.get_config()
  # One client, the same SGD steps and examples per round as the K x E federated ones.
  assert central.fl.num_clients == central.fl.clients_per_round == 1
  assert central.data.partition == "iid"
  assert (central.fl.local_steps * central.fl.batch_size
          == federated.fl.clients_per_round * federated.fl.local_steps * federated.fl.batch_size)


@pytest.mark.parametrize("scale,clients,batch", [
    ("cpu", 5, 32), ("cpu_k10", 10, 32), ("cpu_k10_b16", 10, 16)])
def test_cpu_scales_differ_only_in_clients_and_batch(scale, clients, batch):
  from configs import scales
  config, base = scales.base_for_scale(scale, ""), scales.base_for_scale("cpu", "")
  assert (config.fl.clients_per_round, config.fl.batch_size) == (clients, batch)
  config.fl.clients_per_round, config.fl.batch_size = 5, 32
  assert config.to_dict() == base.to_dict()


# (field, bad value, text the message must contain)
RULES = [
    ("seed", -1, "integer >= 0"),
    ("data.name", "mnist", "fashion_mnist"),
    ("data.image_size", -2, "native"),
    ("data.pretrain_fraction", 1.0, "[0, 1)"),
    ("data.partition", "label", "iid, shards, dirichlet"),
    ("data.shards_per_client", 0, "integer >= 1"),
    ("data.dirichlet_alpha", 0.0, "> 0"),
    ("model.variant", "huge", "tiny"),
    ("model.backbone", "weights.pt", ".npz"),
    ("pretrain.num_classes", 0, "integer >= 1"),
    ("pretrain.steps", 0, "integer >= 1"),
    ("pretrain.batch_size", 0, "integer >= 1"),
    ("pretrain.learning_rate", -1.0, "> 0"),
    ("pretrain.weight_decay", -0.1, ">= 0"),
    ("lora.rank", 0, "integer >= 1"),
    ("lora.alpha", 0.0, "> 0"),
    ("lora.targets", "query,ffn", "query, key, value, out, mlp"),
    ("fl.num_clients", 0, "integer >= 1"),
    ("fl.clients_per_round", 7, "at most fl.num_clients"),
    ("fl.rounds", 0, "integer >= 1"),
    ("fl.local_steps", 0, "integer >= 1"),
    ("fl.batch_size", 0, "integer >= 1"),
    ("fl.client_optimizer", "lbfgs", "sgd, momentum, adam"),
    ("fl.client_lr", 0.0, "> 0"),
    ("fl.lr_schedule", "step", "constant, cosine"),
    ("fl.lr_final_fraction", 1.5, "[0, 1]"),
    ("fl.client_parallelism", 4, "at most fl.clients_per_round"),
    ("fl.value_bits", 8, "one of 16, 32"),
    ("method.name", "fedprox", "dense, soft, tlora, rlora, slora"),
    ("method.penalty", "l1", "offdiag, identity, normalized"),
    ("method.keep_ratio", 0.0, "(0, 1]"),
    ("method.zeta", -0.1, ">= 0"),
    ("method.selection", "random", "per_layer, global"),
    ("method.score", "svd", "factors, update"),
    ("method.aggregation", "median", "all, senders"),
    ("data.partition_seed", -2, "-1 = seed"),
    ("wireless.radius_m", 0.0, "> 0"),
    ("wireless.min_distance_m", 600.0, "below wireless.radius_m"),
    ("wireless.bandwidth_mhz", 0.0, "> 0"),
    ("wireless.shadowing_db", -1.0, ">= 0"),
    ("wireless.device_gflops_min", 0.0, "> 0"),
    ("wireless.device_gflops_max", 1.0, ">= wireless.device_gflops_min"),
    ("wireless.budget_s", -1.0, ">= 0"),
    ("wireless.budget_fraction", 0.0, "> 0"),
    ("wireless.budget_reference", "median", "expected_max, worst"),
    ("wireless.reference_rank", -1, "0 = lora.rank"),
    ("wireless.fading", "rician", "rayleigh, bursty"),
    ("wireless.burst_p_bad", 1.5, "[0, 1]"),
    ("wireless.burst_depth_db", -3.0, ">= 0"),
    ("wireless.csi_error", -0.1, ">= 0"),
    ("wireless.dropout", 1.0, "[0, 1)"),
    ("controller.name", "pid", "fixed, osfa, tsfa"),
    ("controller.V", -1.0, ">= 0"),
    ("controller.solver", "ecos", "cvx, numpy"),
    ("controller.rank_candidates", "4,x", "comma list of ranks"),
    ("controller.spectrum", "flat", "power_law, pilot"),
    ("controller.gamma", 0.0, "> 0"),
    ("controller.lambda_cov", -1.0, ">= 0"),
    ("controller.quantile", 2.0, "[0, 1]"),
    ("controller.pilot_batches", 0, "integer >= 1"),
    ("sweep.mode", "random", "grid, zip"),
    ("sweep.seed", "1,a", "comma list of int"),
    ("eval.every", 0, "integer >= 1"),
    ("eval.num_examples", -1, "0 = whole test split"),
    ("eval.batch_size", 0, "integer >= 1"),
    ("checkpoint.every", 0, "integer >= 1"),
    ("checkpoint.keep", 0, "integer >= 1"),
]


@pytest.mark.parametrize("field,value,allowed", RULES, ids=[r[0] for r in RULES])
def test_each_rule_names_its_field(field, value, allowed):
  config = make_testing_config()
  section, _, leaf = field.rpartition(".")
  (config[section] if section else config)[leaf] = value
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.validate(config)
  assert err.value.field == field
  assert f"config.{field}" in str(err.value) and allowed in str(err.value)


def test_pretrain_backbone_needs_held_out_images():
  config = make_testing_config()
  config.data.pretrain_fraction = 0.0
  with pytest.raises(config_lib.ConfigError, match="data.pretrain_fraction"):
    config_lib.validate(config)
  config.model.backbone = "random"
  config_lib.validate(config)


def test_method_combinations():
  config = make_testing_config()
  config.method.keep_ratio = 0.5
  with pytest.raises(config_lib.ConfigError, match="method.keep_ratio.*dense"):
    config_lib.validate(config)
  config.method.name = "slora"
  config.method.aggregation = "senders"
  with pytest.raises(config_lib.ConfigError, match="method.aggregation.*slora"):
    config_lib.validate(config)
  config.method.aggregation = "all"
  config_lib.validate(config)
  config.method.reorthogonalize = True
  with pytest.raises(config_lib.ConfigError, match="method.reorthogonalize.*slora"):
    config_lib.validate(config)
  config.method.name = "soft"
  config_lib.validate(config)


def test_data_dependent_rules():
  config = make_testing_config()
  with pytest.raises(config_lib.ConfigError, match="pretrain.num_classes.*10 classes"):
    config.pretrain.num_classes = 11
    config_lib.validate_against_data(config, num_classes=10)
  config.pretrain.num_classes = 5
  with pytest.raises(config_lib.ConfigError, match="fl.batch_size.*smallest client.*\\(5\\)"):
    config_lib.validate_against_data(config, num_classes=10, client_sizes=[9, 5, 12])
  with pytest.raises(config_lib.ConfigError, match="fl.num_clients"):
    config_lib.validate_against_data(config, num_classes=10, num_federated=3)


def test_resume_conflicts_ignore_resumable_fields():
  saved = make_testing_config()
  current = make_testing_config()
  current.fl.rounds = 99
  current.eval.every = 3
  assert config_lib.resume_conflicts(saved.to_dict(), current) == []
  current.lora.rank = 2
  conflicts = config_lib.resume_conflicts(saved.to_dict(), current)
  assert conflicts == ["lora.rank: checkpoint has 4, command has 2"]


def test_fields_newer_than_a_checkpoint_conflict_only_when_changed():
  saved = config_lib.base_config().to_dict()
  del saved["wireless"]["csi_error"]  # a run checkpointed before the field existed
  del saved["sweep"]
  current = config_lib.base_config()
  assert config_lib.resume_conflicts(saved, current) == []
  current.wireless.csi_error = 0.3
  assert config_lib.resume_conflicts(saved, current) == [
      "wireless.csi_error: checkpoint has None, command has 0.3"]


def test_controllers_need_lora_targets_and_take_a_dense_upload():
  config = make_testing_config()
  config.controller.name = "osfa"
  config.method.name = "dense"  # osfa splits the band for its whole payload
  config_lib.validate(config)
  config.method.name = "soft"
  config.lora.targets = ""
  with pytest.raises(config_lib.ConfigError, match="controller.name.*LoRA targets"):
    config_lib.validate(config)


FLOAT_FIELDS = [k for k, v in config_lib.flat_items(config_lib.base_config()).items()
                if isinstance(v, float)]


@pytest.mark.parametrize("field", FLOAT_FIELDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_every_float_field_refuses_non_finite_values(field, bad):
  config = make_testing_config()
  section, _, leaf = field.rpartition(".")
  config[section][leaf] = bad
  with pytest.raises(config_lib.ConfigError, match="finite") as err:
    config_lib.validate(config)
  assert err.value.field == field


@pytest.mark.parametrize("field, value, allowed", [
    ("wireless.tx_power_dbm", 120.0, "[-40, 60]"),
    ("wireless.noise_psd_dbm_hz", 10.0, "thermal noise"),
    ("wireless.budget_s", float("inf"), "controller.name = 'fixed'"),
    ("lora.targets", "query,query", "twice"),
])
def test_physically_meaningless_values_are_refused(field, value, allowed):
  config = make_testing_config()
  section, _, leaf = field.rpartition(".")
  config[section][leaf] = value
  with pytest.raises(config_lib.ConfigError, match=re.escape(allowed)) as err:
    config_lib.validate(config)
  assert err.value.field == field


def test_model_rules_name_the_config_field():
  config = make_testing_config()
  config_lib.validate_against_model(config, image_size=8, patch_size=2, min_adapted_width=16)
  with pytest.raises(config_lib.ConfigError, match="lora.rank = 4 .* width 3"):
    config_lib.validate_against_model(config, image_size=8, patch_size=2, min_adapted_width=3)
  config.data.image_size = 9
  with pytest.raises(config_lib.ConfigError, match="data.image_size = 9 .* multiple of 2"):
    config_lib.validate_against_model(config, image_size=9, patch_size=2, min_adapted_width=16)


def test_choice_lists_match_the_library_registries():
  from softjax.config import choices
  from softjax.data import sources
  from softjax.models import vit
  assert sorted(choices.DATA_SOURCES) == sorted(sources.available_sources())
  assert sorted(choices.MODEL_VARIANTS) == sorted(vit.VARIANTS)


def test_config_imports_nothing_from_the_library():
  import ast
  import pathlib
  root = pathlib.Path(config_lib.__file__).parent
  for path in root.glob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("softjax"):
        assert node.module.startswith(("softjax.config", "softjax.errors")), (path, node.module)
