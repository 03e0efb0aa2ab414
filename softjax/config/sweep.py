"""Vmapped hyperparameter sweeps: S settings of one experiment as one compiled program.

A config's `sweep` block names comma lists of values for hyperparameters that enter the round
as traced arrays (or only the host controller), so every setting shares one compiled round:

  sweep.zeta        method.zeta          traced (penalty weight)
  sweep.client_lr   fl.client_lr         traced (the schedule scales it per round)
  sweep.keep_ratio  method.keep_ratio    traced (O for the fixed controller)
  sweep.V           controller.V         host only (P3's Lyapunov weight)
  sweep.seed        seed                 traced keys, host sampling and channel; the data
                                         partition stays the base seed's (shared data)

`sweep.mode = grid` takes the product of the lists, `zip` pairs them element by element. The
experiment loop (`experiment.run`) stacks the S members' states on a leading axis, vmaps the
round over it with the backbone and the data broadcast (not copied), runs one host controller
per member, and writes one metrics row per member and round.

Each member is an ordinary config (`member_configs`): the same setting run alone gives the same
metrics (tested, allclose).
"""

from __future__ import annotations

import itertools
from typing import Any

import ml_collections

from softjax.config.choices import SWEEP_MODES as MODES
from softjax.config.defaults import partition_seed as _partition_seed
from softjax.errors import ConfigError

# sweep field -> the config field it sets, and its type
SWEEPABLE: dict[str, tuple[str, type]] = {
    "zeta": ("method.zeta", float),
    "client_lr": ("fl.client_lr", float),
    "keep_ratio": ("method.keep_ratio", float),
    "V": ("controller.V", float),
    "seed": ("seed", int),
}


def swept_values(config: ml_collections.ConfigDict) -> dict[str, list]:
  """{sweep field: values} for the non-empty lists of config.sweep, in SWEEPABLE order."""
  out = {}
  for name, (_, kind) in SWEEPABLE.items():
    raw = str(config.sweep[name]).strip()
    if not raw:
      continue
    try:
      values = [kind(v) for v in raw.split(",") if v.strip()]
    except ValueError:
      values = []
    if not values:
      raise ConfigError(f"sweep.{name}", config.sweep[name],
                            f"must be a comma list of {kind.__name__} values, e.g. "
                            + ("'0,1,2'" if kind is int else "'0.01,0.1'"))
    out[name] = values
  return out


def is_sweep(config: ml_collections.ConfigDict) -> bool:
  return bool(swept_values(config))


def settings(config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
  """The members' settings, [{sweep field: value}], in row-major (grid) or list (zip) order."""
  values = swept_values(config)
  if not values:
    return [{}]
  names = list(values)
  if config.sweep.mode == "zip":
    lengths = {len(v) for v in values.values()}
    if len(lengths) != 1:
      raise ConfigError(
          "sweep.mode", "zip", "needs lists of one length; got "
          + ", ".join(f"{n}: {len(v)}" for n, v in values.items()))
    combos = zip(*values.values())
  else:
    combos = itertools.product(*values.values())
  return [dict(zip(names, combo)) for combo in combos]


def member_configs(config: ml_collections.ConfigDict) -> list[ml_collections.ConfigDict]:
  """One plain config (no sweep) per member; each runs alone exactly as inside the sweep."""
  if config.sweep.mode not in MODES:
    raise ConfigError("sweep.mode", config.sweep.mode,
                      f"must be one of {', '.join(MODES)}")
  members = []
  partition_seed = _partition_seed(config)
  for setting in settings(config):
    member = ml_collections.ConfigDict(config.to_dict())
    for name in SWEEPABLE:
      member.sweep[name] = ""
    member.data.partition_seed = partition_seed  # the data is shared by every member
    member.update_from_flattened_dict({SWEEPABLE[name][0]: value
                                       for name, value in setting.items()})
    member.lock()
    members.append(member)
  return members
