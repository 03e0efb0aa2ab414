"""experiments/stats.py by hand, and the orthogonality driver end to end at test scale."""

import json
import math
import os

import pytest

from experiments import orthogonality, stats
from softjax.run import experiment


def test_mean_ci95_by_hand():
  # [1, 2, 3]: mean 2, s = 1, t_{0.975, 2} = 4.3027: half-width 4.3027 / sqrt(3) = 2.4842.
  mean, half = stats.mean_ci95([1.0, 2.0, 3.0])
  assert mean == 2.0 and half == pytest.approx(2.48414, abs=1e-4)
  mean, half = stats.mean_ci95([0.5, 0.5, 0.5, 0.5])
  assert (mean, half) == (0.5, 0.0)
  assert math.isnan(stats.mean_ci95([0.7])[1])
  with pytest.raises(ValueError):
    stats.mean_ci95([])


def test_final_accuracy_is_the_mean_of_the_last_three_evaluations():
  rows = [{"round": 1}, {"round": 2, "test_accuracy": 0.1}, {"round": 3, "test_accuracy": 0.2},
          {"round": 4, "test_accuracy": 0.4}, {"round": 5, "test_accuracy": 0.6}]
  assert stats.final_accuracy(rows) == pytest.approx(0.4)
  with pytest.raises(ValueError):
    stats.final_accuracy([{"round": 1}])


@pytest.mark.slow
def test_driver_runs_a_seed_sweep_writes_its_summary_and_resumes(cache_dir, tmp_path,
                                                                  monkeypatch):
  monkeypatch.setenv("SOFTJAX_CACHE_DIR", cache_dir)
  out, workdirs = str(tmp_path / "out"), str(tmp_path / "runs")
  text = orthogonality.run_all(out, workdirs, [0, 1], ["reorth"], "test", 2)
  with open(os.path.join(out, "reorth.json")) as f:
    record = json.load(f)
  assert record["seeds"] == [0, 1] and len(record["per_seed"]) == 2
  for seed in record["per_seed"]:
    assert seed["orth_residual_B"] < 1e-3 and seed["orth_residual_A"] < 1e-3
    assert 0 <= seed["dropped_share"] < 1
  assert "| reorth | offdiag | 0 | yes | 2 |" in text

  def no_rerun(*args, **kwargs):
    raise AssertionError("a finished variant ran again")

  monkeypatch.setattr(experiment, "run", no_rerun)
  assert orthogonality.run_all(out, workdirs, [0, 1], ["reorth"], "test", 2) == text


@pytest.mark.slow
def test_reproduce_refuses_an_unknown_variant_in_one_line(tmp_path):
  import subprocess
  import sys
  proc = subprocess.run([sys.executable, "-m", "experiments.reproduce",
                         "--experiment=orthogonality", "--variants=offdiag,bogus",
                         f"--out={tmp_path}"], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1].startswith("error: --variants has unknown names")
  assert "Traceback" not in proc.stderr
