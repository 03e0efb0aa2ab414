"""Metrics writers besides metrics.jsonl (the record of truth): TensorBoard and Weights & Biases.

Both take the same rows metrics.jsonl gets. Each numeric field becomes a scalar at step
`round`; a sweep member's fields are tagged `member<i>/<field>`. TensorBoard event files are
written by tensorboardX, which needs no TensorFlow; W&B is used only when `wandb` is installed
(and logs offline when WANDB_MODE=offline). A resumed run writes the re-run rounds again: both
tools show the newest value of a step.
"""

from __future__ import annotations

import hashlib
import importlib
import numbers
import os
from typing import Any, Mapping

import ml_collections

from softjax import config as config_lib
from softjax.errors import ConfigError

_NOT_SCALARS = ("round", "member")


def scalars(row: Mapping[str, Any]) -> dict[str, float]:
  """The numeric fields of a row, tagged by sweep member (`member<i>/<field>`)."""
  prefix = f"member{row['member']}/" if "member" in row else ""
  return {prefix + k: float(v) for k, v in row.items()
          if k not in _NOT_SCALARS and isinstance(v, numbers.Real) and not isinstance(v, bool)}


class TensorBoardWriter:
  """TensorBoard event files under `<workdir>/tensorboard` (process p > 0: `.../process<p>`)."""

  def __init__(self, workdir: str, process: int = 0):
    tensorboardx = _import("tensorboard")
    logdir = os.path.join(workdir, "tensorboard", "" if process == 0 else f"process{process}")
    self._writer = tensorboardx.SummaryWriter(logdir=logdir)
    self.logdir = self._writer.logdir

  def write(self, row: Mapping[str, Any]) -> None:
    for tag, value in scalars(row).items():
      self._writer.add_scalar(tag, value, global_step=row["round"])

  def close(self) -> None:
    self._writer.close()


class WandbWriter:
  """One W&B run per workdir: its id is derived from the workdir, so a resume continues it."""

  def __init__(self, workdir: str, config: ml_collections.ConfigDict):
    self._wandb = _import("wandb")
    run_id = hashlib.sha1(os.path.abspath(workdir).encode()).hexdigest()[:16]
    self._run = self._wandb.init(project=config.metrics.wandb_project, id=run_id,
                                 resume="allow", dir=workdir, config=config.to_dict())

  def write(self, row: Mapping[str, Any]) -> None:
    self._run.log(scalars(row), step=row["round"])

  def close(self) -> None:
    self._run.finish()


def make_writers(config: ml_collections.ConfigDict, workdir: str, process: int = 0) -> list:
  """The writers config.metrics.writers names (W&B on process 0 only)."""
  writers = []
  for name in config_lib.metrics_writers(config):
    if name == "tensorboard":
      writers.append(TensorBoardWriter(workdir, process))
    elif name == "wandb" and process == 0:
      writers.append(WandbWriter(workdir, config))
  return writers


_MODULES = {"tensorboard": ("tensorboardX", "pip install tensorboardX"),
            "wandb": ("wandb", "pip install wandb")}


def check_available(config: ml_collections.ConfigDict) -> None:
  """Refuses, before any set-up, a writer whose package is not installed."""
  for name in config_lib.metrics_writers(config):
    _import(name)


def _import(writer: str):
  module, install = _MODULES[writer]
  try:
    return importlib.import_module(module)
  except ImportError:
    raise ConfigError("metrics.writers", writer,
                      f"needs the {module} package, which is not installed: {install}") from None
