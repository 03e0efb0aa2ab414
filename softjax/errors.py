"""The errors a user can fix. Launchers print any `UserError` as one line, without a traceback.

Each kind keeps a built-in base next to `UserError` (a missing dataset is also a
FileNotFoundError, a bad config value a ValueError), so callers that catch the built-in keep
working. This module imports nothing from softjax: every layer may raise these.
"""

from __future__ import annotations

from typing import Any


class UserError(Exception):
  """Something the user asked for cannot be done; the message says what to change."""


class ConfigError(UserError, ValueError):
  """A config value is out of range or inconsistent; the message names the field."""

  def __init__(self, field: str, value: Any, allowed: str, owner: str = "config"):
    """`owner` is "config" for a run config's field, or the dataclass a caller built by hand."""
    self.field = field
    super().__init__(f"{owner}.{field} = {value!r} is invalid: {allowed}")


class SweepRanksError(ConfigError):
  """A sweep's members would train at different LoRA ranks (TSFA's offline stage depends on
  the seed through the channel); a rank is a shape, so one program cannot hold them."""


class ConfigFileError(UserError):
  """A `--config=FILE.py:arg` spec names no file, or its argument cannot be parsed.

  Deliberately not a ValueError: absl's flag parser would fold a ValueError raised while
  loading the config into a multi-line traceback message; this one reaches the launcher."""


class DatasetNotFoundError(UserError, FileNotFoundError):
  """The requested dataset is not available locally; the message says how to prepare it."""


class DatasetCorruptError(DatasetNotFoundError):
  """A dataset file exists but cannot be read (truncated, damaged); the message names it and says
  how to get a good copy. A subclass of DatasetNotFoundError: the usable data is missing."""


class CheckpointMismatchError(UserError, ValueError):
  """A pretrained checkpoint does not fit the model; the message lists every differing key."""


class BackboneError(UserError, FileNotFoundError):
  """A pretrained backbone `.npz` is missing or cannot be read; the message names the file and
  how to get a good one."""


class CheckpointError(UserError, RuntimeError):
  """A run checkpoint cannot be used to resume; the message says why and what to do."""


class UnreadableCheckpointError(CheckpointError):
  """Every checkpoint in the directory failed to load."""


class NonFiniteLossError(UserError, FloatingPointError):
  """Training produced NaN/inf; the last good checkpoint is kept."""


class WorkdirError(UserError, OSError):
  """The workdir cannot be used (not writable, or another live run holds it)."""


class MetricsError(UserError, RuntimeError):
  """metrics.jsonl is missing rounds that no checkpoint can recompute; the message lists them."""


class Interrupted(UserError):
  """The user stopped the run (Ctrl-C); the newest checkpoint is complete and resumable."""

  exit_status = 130  # the shell's convention for a run ended by SIGINT
