"""Run configuration: defaults, choices, validation, config files and sweeps.

This package imports nothing from the rest of softjax except `softjax.errors`, so every layer of
the library may read its choice lists.
"""

from softjax.config.checks import (
    client_ranks,
    rank_candidates,
    validate,
    validate_against_data,
    validate_against_model,
    validate_mesh_devices,
)
from softjax.config.defaults import (
  RESUMABLE_FIELDS,
  base_config,
  lora_targets,
  metrics_writers,
  partition_seed,
)
from softjax.config.files import (
  flat_items,
  load,
  parse_arg,
  require_config_file,
  resume_conflicts,
)
from softjax.errors import ConfigError, ConfigFileError

__all__ = [
    "ConfigError", "ConfigFileError", "RESUMABLE_FIELDS", "base_config", "client_ranks",
    "flat_items",
    "load", "lora_targets", "metrics_writers", "parse_arg", "partition_seed", "rank_candidates",
    "require_config_file", "resume_conflicts",
    "validate", "validate_against_data", "validate_against_model", "validate_mesh_devices",
]
