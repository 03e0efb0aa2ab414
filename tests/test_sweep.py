"""Vmapped sweeps: S settings in one compiled program equal the same settings run alone."""

import os

import numpy as np
import pytest

from softjax import config as config_lib
from softjax import errors
from softjax.config import sweep
from softjax.run import experiment
from softjax.run import metrics as metrics_lib
from tests.support import comparable, make_config

ROUNDS = 4
SWEEP = {"method.name": "soft", "controller.name": "osfa", "sweep.mode": "zip",
         "sweep.zeta": "0.0,0.5,0.2", "sweep.client_lr": "0.1,0.05,0.1", "sweep.V": "1,4,0.5",
         "sweep.seed": "0,1,2"}


def test_grid_and_zip_settings():
  config = config_lib.base_config()
  config.sweep.zeta = "0,0.1"
  config.sweep.V = "1,2,3"
  assert sweep.settings(config) == [{"zeta": z, "V": v} for z in (0.0, 0.1) for v in (1., 2., 3.)]
  config.sweep.mode = "zip"
  with pytest.raises(config_lib.ConfigError, match="sweep.mode"):
    sweep.settings(config)
  config.sweep.V = "1,2"
  assert sweep.settings(config) == [{"zeta": 0.0, "V": 1.0}, {"zeta": 0.1, "V": 2.0}]
  members = sweep.member_configs(config)
  assert [(m.method.zeta, m.controller.V, m.sweep.zeta) for m in members] == [
      (0.0, 1.0, ""), (0.1, 2.0, "")]


def test_bad_sweeps_name_the_field():
  config = config_lib.base_config()
  config.sweep.zeta = "0,abc"
  with pytest.raises(config_lib.ConfigError, match="sweep.zeta"):
    config_lib.validate(config)
  config.sweep.zeta = ""
  config.sweep.keep_ratio = "0.5,2"
  config.method.name = "soft"
  with pytest.raises(config_lib.ConfigError, match="method.keep_ratio = 2.0"):
    config_lib.validate(config)


@pytest.fixture(scope="module")
def swept(cache_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("sweep"))
  return workdir, experiment.run(make_config(cache_dir, rounds=ROUNDS, **SWEEP), workdir)


def _numbers(row):
  return {k: v for k, v in row.items() if isinstance(v, (int, float)) and
          k not in metrics_lib.TIMING_FIELDS and k != "member" and not k.startswith("sweep.")}


@pytest.mark.slow
def test_each_member_equals_its_setting_run_alone(swept, cache_dir, tmp_path):
  _, summary = swept
  assert summary["round_traces"] == 1  # three settings, one compilation
  members = sweep.member_configs(make_config(cache_dir, rounds=ROUNDS, **SWEEP))
  assert len(summary["members"]) == len(members) == 3
  for i, (member_config, result) in enumerate(zip(members, summary["members"])):
    alone = experiment.run(member_config, str(tmp_path / f"alone{i}"))
    assert result["setting"] == sweep.settings(make_config(cache_dir, **SWEEP))[i]
    assert len(result["rows"]) == len(alone["rows"]) == ROUNDS
    for got, want in zip(result["rows"], alone["rows"]):
      got, want = _numbers(got), _numbers(want)
      assert got.keys() == want.keys()
      # Discrete decisions (bits, m, solver) must match; float32 values may differ in the
      # last digits because vmapped matmuls batch differently (cov_term, a difference of
      # products, loses the most).
      for key in got:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-3, atol=2e-3 if key ==
                                   "test_accuracy" else 1e-6, err_msg=f"member {i}, {key}")
      assert got["uplink_bits"] == want["uplink_bits"]
      assert got["kept_components"] == want["kept_components"]


@pytest.mark.slow
def test_sweep_rows_carry_the_settings_and_resume(swept, cache_dir, tmp_path):
  full_dir, _ = swept
  want = metrics_lib.read_rows(os.path.join(full_dir, "metrics.jsonl"))
  assert [(r["round"], r["member"]) for r in want[:4]] == [(1, 0), (1, 1), (1, 2), (2, 0)]
  assert want[1]["sweep.zeta"] == 0.5 and want[1]["sweep.seed"] == 1
  workdir = str(tmp_path / "resumed")

  def crash_after_round_3(t):
    if t == 3:
      raise KeyboardInterrupt

  config = make_config(cache_dir, rounds=ROUNDS, **SWEEP)
  with pytest.raises(errors.Interrupted):  # Ctrl-C in the loop: one line, resumable
    experiment.run(config, workdir, on_round_end=crash_after_round_3)
  experiment.run(config, workdir)
  assert comparable(metrics_lib.read_rows(os.path.join(workdir, "metrics.jsonl"))) == \
      comparable(want)
