"""experiments/stats.py by hand, and the orthogonality driver end to end at test scale."""

import copy
import json
import math
import os

import pytest

from experiments import orthogonality, seeded, stats
from softjax import errors
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
  out, runs, workdirs = (str(tmp_path / d) for d in ("out", "runs", "work"))
  text = orthogonality.run_all(out, runs, workdirs, [0, 1], ["reorth"], "test", 2)
  with open(os.path.join(runs, "soft_r8_reorth.json")) as f:
    record = json.load(f)
  assert record["seeds"] == [0, 1] and len(record["per_seed"]) == 2
  assert (record["method"], record["rank"], record["variant"]) == ("soft", 8, "reorth")
  for seed in record["per_seed"]:
    assert seed["orth_residual_B"] < 1e-3 and seed["orth_residual_A"] < 1e-3
    assert 0 <= seed["dropped_share"] < 1
    assert seed["curve"]["round"][-1] == 2 and seed["cum_uplink_bits"] > 0
  assert "| reorth | offdiag | 0 | yes | 2 |" in text
  assert open(os.path.join(out, "orthogonality.md")).read() == text

  def no_rerun(*args, **kwargs):
    raise AssertionError("a finished variant ran again")

  monkeypatch.setattr(experiment, "run", no_rerun)
  assert orthogonality.run_all(out, runs, workdirs, [0, 1], ["reorth"], "test", 2) == text
  # A summary with other seeds is not silently reused.
  with pytest.raises(errors.UserError, match="holds seeds \\[0, 1\\]"):
    orthogonality.run_all(out, runs, workdirs, [0, 1, 2], ["reorth"], "test", 2)


def test_a_damaged_run_summary_is_named_in_one_line(tmp_path):
  (tmp_path / "soft_r8_reorth.json").write_text('{"seeds": [0, 1], "per_')
  with pytest.raises(errors.UserError, match="soft_r8_reorth.json is not a readable run "
                     "summary .*delete it"):
    orthogonality.run_variant("reorth", [0, 1], "test", 2, str(tmp_path), str(tmp_path))


def test_seed_record_by_hand():
  rows = [{"round": t, "cum_uplink_bits": 100 * t, "orth_residual_B": 0.1 * t,
           "orth_residual_A": 0.0, "score_gap": 0.5, "dropped_energy": 1.0,
           "score_energy": 4.0, "cov_term": 2.0, "queue": 0.5 * t, "keep_ratio": 0.5,
           "fallbacks": t % 3 == 0, **({"test_accuracy": 0.1 * t} if t % 2 == 0 else {})}
          for t in range(1, 31)]
  rows[-1]["test_accuracy_full"] = 0.33
  member = {"rows": rows, "rank": 8, "offline": None, "latency_budget_s": 0.5,
            "mean_latency_s": 0.25, "max_queue": 15.0}
  record = seeded.seed_record(member)
  assert record["final_accuracy"] == pytest.approx((2.6 + 2.8 + 3.0) / 3)
  assert record["final_accuracy_full"] == 0.33 and record["cum_uplink_bits"] == 3000
  assert record["curve"]["round"] == list(range(2, 31, 2))
  # Diagnostics over the last 20 rounds (11..30): mean of 0.1 t is 2.05.
  assert record["orth_residual_B"] == pytest.approx(2.05)
  assert record["dropped_share"] == pytest.approx(0.25) and record["score_gap"] == 0.5
  assert record["mean_cov_term"] == 2.0 and record["latency_over_budget"] == 0.5
  assert record["final_queue"] == 15.0 and record["fallbacks"] == 10
  assert record["queue"][:2] == [0.5, 1.0] and record["mean_keep_ratio"] == 0.5
  assert "orth_residual_B" not in seeded.seed_record(
      dict(member, rows=[dict(r, score_energy=0.0) for r in rows]))  # not a SOFT run


@pytest.mark.slow
@pytest.mark.parametrize("experiment_name,flag,line", [
    ("orthogonality", "--variants=offdiag,bogus", "error: --variants has unknown names"),
    ("orthogonality", "--seeds=0,x", "error: --seeds must be integers"),
    ("e1", "--seeds=1,1", "error: --seeds must be distinct integers"),
    ("e2", "--seeds=", "error: --seeds must be distinct integers"),
])
def test_reproduce_refuses_bad_flags_in_one_line(experiment_name, flag, line, tmp_path):
  import subprocess
  import sys
  proc = subprocess.run([sys.executable, "-m", "experiments.reproduce",
                         f"--experiment={experiment_name}", flag, "--scale=test",
                         f"--out={tmp_path}"], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1].startswith(line)
  assert "Traceback" not in proc.stderr


def test_table_pairs_each_variant_with_the_baseline_by_seed():
  def record(name, accs):
    penalty, zeta, reorth = orthogonality.VARIANTS[name]
    return {"variant": name, "penalty": penalty, "zeta": zeta, "reorthogonalize": reorth,
            "seeds": [0, 1, 2], "per_seed": [
                {"final_accuracy": a, "orth_residual_B": 0.5, "orth_residual_A": 0.1,
                 "score_gap": 0.2, "dropped_share": 0.3} for a in accs]}

  text = orthogonality.table([record("no_penalty", [0.60, 0.50, 0.70]),
                              record("reorth", [0.62, 0.52, 0.72])])
  # The seeds differ by 10 points, the pairs by exactly 2: the paired interval is zero.
  assert "| reorth | offdiag | 0 | yes | 3 | 0.6200 ± 0.2484 |" in text
  assert text.splitlines()[-1].endswith("| +0.0200 ± 0.0000 |")


def _stored_run(tmp_path, config, **changes):
  """A finished run's summary as seeded.run writes it, with `changes` applied."""
  record = {"name": "dense_r8", "method": "dense", "rank": 8, "seeds": [0, 1],
            "config_sha256": seeded.fingerprint(config),
            "per_seed": [{"setting": {"seed": s}, "final_accuracy": 0.5,
                          "curve": {"round": [10, config.fl.rounds]}} for s in (0, 1)]}
  record.update(changes)
  (tmp_path / "dense_r8.json").write_text(json.dumps(record))
  return record


@pytest.mark.parametrize("change, line", [
    ({"seeds": [0, 1, 2]}, "holds seeds \\[0, 1, 2\\], not the \\[0, 1\\] asked for"),
    ({"rank": 4}, "has rank=4, not the 8 asked for"),
    ({"config_sha256": "0123456789abcdef"}, "was run with another configuration"),
    ({"config_sha256": None, "per_seed": [{"curve": {"round": [10, 20]}}]},
     "ran 20 rounds, not the 80 asked for"),
])
def test_a_summary_of_another_run_is_refused_in_one_line(tmp_path, monkeypatch, change, line):
  def no_run(*args, **kwargs):
    raise AssertionError("seeded.run ran instead of reading or refusing")

  monkeypatch.setattr(experiment, "run", no_run)
  from configs import quickstart
  config = quickstart.get_config()
  fields = {"method": "dense", "rank": 8}
  stored = _stored_run(tmp_path, config)
  assert seeded.run("dense_r8", config, [0, 1], str(tmp_path), str(tmp_path), fields) == stored
  # Where the run executes (its parallelism, checkpoint cadence, seeds) is not its identity.
  moved = copy.deepcopy(config).unlock()
  moved.fl.client_parallelism, moved.checkpoint.every, moved.seed = 2, 1, 7
  assert seeded.fingerprint(moved) == seeded.fingerprint(config)
  _stored_run(tmp_path, config, **change)
  with pytest.raises(errors.UserError, match=f"dense_r8.json {line}.*delete it"):
    seeded.run("dense_r8", config, [0, 1], str(tmp_path), str(tmp_path), fields)
  # A field added after the runs were recorded counts only once it leaves its default.
  older = copy.deepcopy(config).unlock()
  del older.method["client_ranks"]
  assert seeded.fingerprint(older) == seeded.fingerprint(config)
  moved.method.client_ranks = "2,4"
  assert seeded.fingerprint(moved) != seeded.fingerprint(config)
  moved.method.client_ranks = ""
  # A change of what decides the numbers changes the fingerprint.
  moved.fl.client_lr = 0.05
  assert seeded.fingerprint(moved) != seeded.fingerprint(config)


def test_the_committed_e7_summaries_match_the_configs_that_would_rerun_them():
  # A config field added later must not orphan the committed runs (seeded._ADDED_FIELDS).
  from experiments import e7

  root = os.path.join(os.path.dirname(__file__), "..", "docs", "results", "runs")
  checked = 0
  for rule in e7.choices.AGGREGATION_RULES:
    path = os.path.join(root, f"e7_{rule}.json")
    if os.path.exists(path):
      with open(path) as f:
        stored = json.load(f)["config_sha256"]
      assert stored == seeded.fingerprint(e7._rule_config(rule, "cpu", 80, "ViT-B_16.npz")), rule
      checked += 1
  assert checked >= 5


def test_seeds_that_tsfa_gives_different_ranks_run_one_by_one(tmp_path, monkeypatch):
  # A rank is a shape: the sweep refuses, so each seed runs alone in its own workdir.
  from configs import quickstart

  calls = []

  def fake_run(config, workdir):
    calls.append((config.sweep.seed, config.seed, os.path.basename(workdir)))
    if config.sweep.seed:
      raise errors.SweepRanksError("sweep", {"seed": [0, 1]}, "gives members different ranks")
    rows = [{"round": t, "round_time_s": 1.5 + config.seed, "cum_uplink_bits": 10 * t,
             "cov_term": 0.0, "test_accuracy": 0.5 + 0.1 * config.seed, "queue": 0.0,
             "keep_ratio": 1.0, "fallbacks": 0} for t in (1, 2, 3)]
    return {"rows": rows, "rank": 2 + 2 * config.seed, "lora_template": {}, "wall_time_s": 7.0,
            "offline": None, "latency_budget_s": 1.0, "mean_latency_s": 0.5, "max_queue": 0.0}

  monkeypatch.setattr(experiment, "run", fake_run)
  config = quickstart.get_config("rounds=3")
  record = seeded.run("e7_x_tsfa", config, [0, 1], str(tmp_path), str(tmp_path), {"method": "x"})
  assert calls == [("0,1", 0, "e7_x_tsfa"), ("", 0, "e7_x_tsfa_seed0"),
                   ("", 1, "e7_x_tsfa_seed1")]
  assert record["one_by_one"] and [s["setting"] for s in record["per_seed"]] == [
      {"seed": 0}, {"seed": 1}]
  assert [s["final_accuracy"] for s in record["per_seed"]] == pytest.approx([0.5, 0.6])
  assert [s["rank"] for s in record["per_seed"]] == [2, 4]
  assert record["round_time_s"] == pytest.approx(3 * 1.5 + 3 * 2.5)  # both seeds' rounds
  assert record["wall_time_s"] == 14.0
  from experiments import round_timing
  assert record["machine"] == {**round_timing.cpu(), "backend": "cpu",
                               "jaxlib_version": record["machine"]["jaxlib_version"]}
