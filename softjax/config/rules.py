"""Range rules, each written once: the config checks and the library's dataclasses both call them.

A rule names the field the caller gives it, so a bad `--config.wireless.radius_m` is reported
as `config.wireless.radius_m` and a bad `ChannelConfig(radius_m=...)` built by hand as
`ChannelConfig.radius_m`. Every number must be finite: a NaN or an infinity is never a
meaningful setting. This module imports only `softjax.errors` and `config.choices`.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

from softjax.config import choices
from softjax.errors import ConfigError


def check(ok: bool, field: str, value: Any, allowed: str, owner: str = "config") -> None:
  """Raises ConfigError naming `owner.field` unless ok."""
  if not ok:
    raise ConfigError(field, value, allowed, owner=owner)


def choice(field: str, value: Any, allowed: Iterable[str], owner: str = "config") -> None:
  allowed = tuple(allowed)
  check(value in allowed, field, value, f"must be one of {', '.join(map(str, allowed))}", owner)


def boolean(field: str, value: Any) -> None:
  check(isinstance(value, bool), field, value, "must be True or False")


def integer(field: str, value: Any, low: int, high: int | None = None, what: str = "",
            owner: str = "config") -> None:
  """An int (not a bool) in [low, high]."""
  ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
  ok = ok and (high is None or value <= high)
  bound = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
  check(ok, field, value, f"must be {bound}{what}", owner)


def is_number(value: Any) -> bool:
  """A finite int or float (a bool is not a number here)."""
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def number(field: str, value: Any, low: float | None = None, high: float | None = None, *,
           open_low: bool = False, open_high: bool = False, what: str = "",
           owner: str = "config") -> None:
  """A finite number in the interval given by low/high (closed unless open_*)."""
  ok = is_number(value)
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
  check(ok, field, value, f"must be a finite number {bound}{what}".rstrip(), owner)


def positive(field: str, value: Any, what: str = "", owner: str = "config") -> None:
  number(field, value, 0, open_low=True, what=what, owner=owner)


# ------------------------------------------------------------------ rules of one concept each


def cell(values: Mapping[str, Any], names: Mapping[str, str], owner: str = "config") -> None:
  """The cell and its radio (ALGORITHM.md 4): geometry, power, noise, band, shadowing, devices.

  Args:
    values: radius_m, min_distance_m, tx_power_dbm, noise_psd_dbm_hz, bandwidth (any unit),
      shadowing_db, device_flops_min, device_flops_max (any unit, the same for both).
    names: the caller's field name of each of those keys.
    owner: "config" or the dataclass's name.
  """
  v, n = values, names
  positive(n["radius_m"], v["radius_m"], owner=owner)
  positive(n["min_distance_m"], v["min_distance_m"], owner=owner)
  check(v["min_distance_m"] < v["radius_m"], n["min_distance_m"], v["min_distance_m"],
        f"must be below {n['radius_m']} ({v['radius_m']})", owner)
  # Physical ranges, wide enough for any cell: 0.1 uW to 1 kW of transmit power; a noise PSD
  # around the thermal -174 dBm/Hz (at 290 K), anything above -100 dBm/Hz is no receiver.
  number(n["tx_power_dbm"], v["tx_power_dbm"], -40, 60, what=" dBm", owner=owner)
  number(n["noise_psd_dbm_hz"], v["noise_psd_dbm_hz"], -220, -100,
         what=" dBm/Hz (thermal noise at 290 K is -174)", owner=owner)
  positive(n["bandwidth"], v["bandwidth"], owner=owner)
  number(n["shadowing_db"], v["shadowing_db"], 0, what=" (0 = off)", owner=owner)
  positive(n["device_flops_min"], v["device_flops_min"], owner=owner)
  number(n["device_flops_max"], v["device_flops_max"], v["device_flops_min"],
         what=f" (>= {n['device_flops_min']})", owner=owner)


def patch_grid(image_size: int, patch_size: int, field: str, value: Any, hint: str = "",
               owner: str = "config") -> None:
  """The patch size divides the image side (a ViT sees whole patches only)."""
  check(image_size % patch_size == 0, field, value,
        f"gives {image_size}x{image_size} images, not a multiple of the patch size "
        f"{patch_size}{hint}", owner)


def lora_targets(field: str, targets: Iterable[str], owner: str = "config") -> None:
  """Every target one of choices.LORA_TARGETS, none twice."""
  targets = tuple(targets)
  for target in targets:
    choice(field, target, choices.LORA_TARGETS, owner)
  check(len(set(targets)) == len(targets), field, targets, "names a projection twice", owner)
