"""Config files and specs: `FILE.py:arg` loading, the arg parser, and resume comparison."""

from __future__ import annotations

import ast
import os
from typing import Any

import ml_collections

from softjax.config.defaults import RESUMABLE_FIELDS, base_config
from softjax.errors import ConfigFileError


def load(spec: str, root: str | None = None) -> ml_collections.ConfigDict:
  """The config a launcher's `--config=FILE.py:arg` would give, for notebooks and scripts.

  Args:
    spec: `path/to/config.py` or `path/to/config.py:arg`, relative to `root`.
    root: the directory relative paths start from (default: the repository of this package).
  """
  import importlib.util

  path, _, arg = spec.partition(":")
  root = root or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  full = path if os.path.isabs(path) else os.path.join(root, path)
  require_config_file(full)
  module_spec = importlib.util.spec_from_file_location(
      os.path.splitext(os.path.basename(full))[0], full)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def require_config_file(path: str) -> None:
  """Raises ConfigFileError, naming `path`, when it is not a file."""
  if not os.path.isfile(path):
    raise ConfigFileError(f"config file {path} does not exist; pass a file from configs/, e.g. "
                          "configs/quickstart.py")


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses a config-file argument `key=value,flag` into a ConfigDict of typed values.

  `configs/quickstart.py:rounds=3,runlocal` passes "rounds=3,runlocal"; a bare name sets a
  boolean default to True. Values take the type of their default.
  """
  parsed = ml_collections.ConfigDict(defaults)
  for item in filter(None, (s.strip() for s in (arg or "").split(","))):
    key, _, raw = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ConfigFileError(f"config argument {item!r} is unknown: the arguments of this config "
                            f"file are {', '.join(sorted(defaults))}")
    parsed[key] = _arg_value(key, raw.strip(), defaults[key])
  return parsed


def _arg_value(key: str, raw: str, default: Any) -> Any:
  """A `key=raw` argument as the type of its default; a bare `key` is True."""
  if not raw:
    if isinstance(default, bool):
      return True
    raise ConfigFileError(f"config argument {key!r} needs a value ({key}=...; default "
                          f"{default!r})")
  if isinstance(default, str):
    return raw
  kind = type(default)
  try:
    value = ast.literal_eval(raw)
    if kind is bool and not isinstance(value, bool):
      raise ValueError
    if kind is int and not (isinstance(value, int) or float(value).is_integer()):
      raise ValueError
    return kind(value)
  except (ValueError, SyntaxError, TypeError):
    article = "an" if kind.__name__[0] in "aeiou" else "a"
    raise ConfigFileError(f"config argument {key}={raw!r} is invalid: {key} takes {article} "
                          f"{kind.__name__} (default {default!r})") from None


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
