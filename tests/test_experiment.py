"""End-to-end runs of the `testing` config: outputs, no recompiles, kill-and-resume equality."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments import stats

from softjax import errors
from softjax.models import checkpoint as ckpt_lib
from softjax.run import checkpointing, experiment
from softjax.run import metrics as metrics_lib
from softjax.tsfa import solvers
from tests.support import (REPO, ROUNDS, comparable, env_without_compilation_cache,
                           make_config)


@pytest.fixture(scope="module")
def uninterrupted(cache_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("full"))
  summary = experiment.run(make_config(cache_dir), workdir)
  return workdir, summary


@pytest.mark.slow
def test_run_writes_config_metrics_and_checkpoints(uninterrupted, cache_dir):
  workdir, summary = uninterrupted
  rows = metrics_lib.read_rows(os.path.join(workdir, "metrics.jsonl"))
  assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
  for r in rows:
    assert {"round", "train_loss", "uplink_bits", "cum_uplink_bits", "round_time_s"} <= set(r)
    assert np.isfinite(r["train_loss"])
  # Evaluated every 2 rounds and always on the last.
  assert [r["round"] for r in rows if "test_accuracy" in r] == [2, 4, 6]
  assert rows[-1]["cum_uplink_bits"] == sum(r["uplink_bits"] for r in rows)
  assert summary["final_accuracy"] == rows[-1]["test_accuracy"]
  assert summary["round_traces"] == 1  # one compilation for the whole run
  saved = json.load(open(os.path.join(workdir, "config.json")))
  assert saved["fl"]["rounds"] == ROUNDS
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))
                 if s.isdigit())
  assert steps == [4, 6]  # every 2 rounds, keep the newest 2
  assert len([f for f in os.listdir(cache_dir) if f.endswith(".npz")]) == 1


@pytest.mark.slow
def test_uplink_bits_follow_the_dense_payload(uninterrupted):
  workdir, _ = uninterrupted
  rows = metrics_lib.read_rows(os.path.join(workdir, "metrics.jsonl"))
  # tiny ViT: width 16, depth 2, rank 4 on query and value -> 4 matrices of 16x16;
  # head 16x10 + 10; 3 clients per round; float32.
  per_client = 32 * 4 * (4 * (16 + 16)) + 32 * (16 * 10 + 10)
  assert {r["uplink_bits"] for r in rows} == {3 * per_client}


@pytest.mark.slow
def test_interrupted_run_resumes_to_identical_metrics(uninterrupted, cache_dir, tmp_path):
  full_dir, full = uninterrupted
  workdir = str(tmp_path / "resumed")

  def crash_after_round_3(t):
    if t == 3:  # the row of round 3 is written, the newest checkpoint is round 2
      raise KeyboardInterrupt

  with pytest.raises(errors.Interrupted):  # Ctrl-C in the loop: one line, resumable
    experiment.run(make_config(cache_dir), workdir, on_round_end=crash_after_round_3)
  assert len(metrics_lib.read_rows(os.path.join(workdir, "metrics.jsonl"))) == 3
  resumed = experiment.run(make_config(cache_dir), workdir)
  want = metrics_lib.read_rows(os.path.join(full_dir, "metrics.jsonl"))
  got = metrics_lib.read_rows(os.path.join(workdir, "metrics.jsonl"))
  assert comparable(got) == comparable(want)
  assert resumed["final_accuracy"] == full["final_accuracy"]


@pytest.mark.slow
def test_killed_launcher_resumes_to_identical_metrics(uninterrupted, cache_dir, tmp_path):
  """SIGKILL the real launcher mid-run, start the same command again, compare every row."""
  full_dir, _ = uninterrupted
  workdir = str(tmp_path / "killed")
  command = [sys.executable, "-m", "experiments.run",
             f"--config=configs/testing.py:rounds={ROUNDS}", f"--workdir={workdir}",
             f"--config.model.cache_dir={cache_dir}"]
  env = env_without_compilation_cache()
  proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, env=env)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 120
  while len(metrics_lib.read_rows(metrics_path)) < 3 and proc.poll() is None:
    assert time.time() < deadline, "the launcher made no progress"
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = len(metrics_lib.read_rows(metrics_path))
  assert killed_at < ROUNDS, "the run finished before it could be killed"
  done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "final test accuracy" in done.stdout
  want = metrics_lib.read_rows(os.path.join(full_dir, "metrics.jsonl"))
  assert comparable(metrics_lib.read_rows(metrics_path)) == comparable(want)


def test_resume_with_a_different_rank_fails_loudly(uninterrupted, cache_dir):
  workdir, _ = uninterrupted
  with pytest.raises(checkpointing.CheckpointError, match="lora"):
    experiment.run(make_config(cache_dir, **{"lora.rank": 2}), workdir)


def test_resume_with_a_changed_setting_names_it(uninterrupted, cache_dir):
  workdir, _ = uninterrupted
  with pytest.raises(checkpointing.CheckpointError, match="fl.client_lr"):
    experiment.run(make_config(cache_dir, **{"fl.client_lr": 0.3}), workdir)


@pytest.mark.slow
def test_more_rounds_extend_a_finished_run(uninterrupted, cache_dir, tmp_path):
  workdir, _ = uninterrupted
  copy = str(tmp_path / "extended")
  subprocess.run(["cp", "-r", workdir, copy], check=True)
  summary = experiment.run(make_config(cache_dir, rounds=ROUNDS + 1), copy)
  rows = summary["rows"]
  assert [r["round"] for r in rows] == list(range(1, ROUNDS + 2))
  assert summary["round_traces"] == 1


def test_head_only_and_vmapped_clients_run(cache_dir, tmp_path):
  summary = experiment.run(
      make_config(cache_dir, rounds=2, **{"lora.targets": "", "fl.client_parallelism": 3}),
      str(tmp_path / "head"))
  assert summary["rows"][-1]["uplink_bits"] == 3 * 32 * (16 * 10 + 10)


def test_missing_backbone_file_is_a_clear_error(cache_dir, tmp_path):
  config = make_config(cache_dir, **{"model.backbone": str(tmp_path / "nope.npz")})
  with pytest.raises(FileNotFoundError, match="nope.npz"):
    experiment.run(config, str(tmp_path / "w"))


@pytest.mark.slow
def test_pretrain_launcher_writes_a_loadable_checkpoint(cache_dir, tmp_path):
  out = str(tmp_path / "vit_tiny.npz")
  done = subprocess.run(
      [sys.executable, "-m", "experiments.pretrain", "--config=configs/testing.py",
       f"--out={out}", "--config.pretrain.steps=10"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  flat = ckpt_lib.load_npz(out)
  assert flat["head/kernel"].shape == (16, 5)  # pretrained on 5 classes
  summary = experiment.run(make_config(cache_dir, rounds=1, **{"model.backbone": out}),
                           str(tmp_path / "from_npz"))
  assert summary["rounds"] == 1


@pytest.mark.slow
def test_launcher_reports_a_bad_config_in_one_line(tmp_path):
  done = subprocess.run(
      [sys.executable, "-m", "experiments.run", "--config=configs/testing.py",
       f"--workdir={tmp_path}", "--config.fl.clients_per_round=50"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert done.returncode == 1
  assert done.stderr.strip().splitlines()[-1] == (
      "error: config.fl.clients_per_round = 50 is invalid: must be an integer in [1, 6] "
      "(at most fl.num_clients)")
  assert "Traceback" not in done.stderr


@pytest.mark.parametrize("spec, line", [
    ("configs/nothere.py", "error: config file configs/nothere.py does not exist; "
     "pass a file from configs/, e.g. configs/quickstart.py"),
    ("configs/testing.py:rounds=x", "error: config argument rounds='x' is invalid: rounds takes "
     "an int (default 4)"),
    ("configs/testing.py:roundz=3", "error: config argument 'roundz=3' is unknown: the "
     "arguments of this config file are rounds"),
])
@pytest.mark.slow
def test_launcher_reports_bad_config_specs_in_one_line(spec, line, tmp_path):
  done = subprocess.run([sys.executable, "-m", "experiments.run", f"--config={spec}",
                         f"--workdir={tmp_path}"], cwd=REPO, capture_output=True, text=True,
                        timeout=120)
  assert done.returncode == 1
  assert done.stderr.strip().splitlines() == [line]


def reproduce(cache_dir, out, experiment_name, *flags, timeout=600):
  """Runs the reproduction driver at test scale in a subprocess; returns its output dir."""
  done = subprocess.run(
      [sys.executable, "-m", "experiments.reproduce", f"--experiment={experiment_name}",
       "--scale=test", f"--out={out}", *flags],
      cwd=REPO, capture_output=True, text=True, timeout=timeout,
      env={**os.environ, "SOFTJAX_CACHE_DIR": cache_dir})
  assert done.returncode == 0, done.stderr[-3000:]
  return out


@pytest.mark.slow
def test_e1_driver_writes_seeded_runs_claims_table_and_plot(cache_dir, tmp_path):
  out = reproduce(cache_dir, str(tmp_path / "e1"), "e1", "--rounds=2", "--seeds=0,1",
                  "--ranks=4", "--variants=reorth")
  names = {"dense_r4", "tlora_r4", "rlora_r4", "slora_r4", "soft_r4_reorth", "centralized_r4",
           "head_only"}
  assert {f[:-5] for f in os.listdir(os.path.join(out, "runs"))} == names
  for name in names:  # one vmapped sweep per run: both seeds in one summary
    run = json.load(open(os.path.join(out, "runs", f"{name}.json")))
    assert run["seeds"] == [0, 1] and len(run["per_seed"]) == 2
  rows = {r["label"]: r for r in json.load(open(os.path.join(out, "e1.json")))}
  assert set(rows) == {"dense", "tlora", "rlora", "slora", "soft/reorth", "centralized",
                       "head_only"}
  # O = 0.5 sends fewer bits than dense; the equal-uplink budget is the cheapest run's.
  assert max(rows["soft/reorth"]["uplink_mb"]) < min(rows["dense"]["uplink_mb"])
  assert rows["dense"]["equal_uplink_mb"] == pytest.approx(
      min(sum(r["uplink_mb"]) / 2 for r in rows.values()
          if r["method"] not in ("centralized", "head_only")))
  assert rows["head_only"]["accuracy_at_equal_uplink"] is None
  claims = json.load(open(os.path.join(out, "summary.json")))
  keys = {"experiment", "method", "rank", "keep_ratio", "metric", "mean", "ci95", "n_seeds",
          "seeds", "command"}
  assert all(set(c) == keys and c["experiment"] == "e1" for c in claims)
  final = {c["method"]: c for c in claims if c["metric"] == "final_accuracy"}
  assert set(final) == set(rows) and final["tlora"]["seeds"] == [0, 1]
  assert final["tlora"]["mean"] == pytest.approx(sum(rows["tlora"]["final_accuracy"]) / 2)
  assert final["tlora"]["command"].startswith("python -m experiments.reproduce --experiment=e1")
  table = open(os.path.join(out, "e1.md")).read()
  assert "| soft/reorth | 4 | 0.50 | 2 |" in table and "| head_only | - |" in table
  assert os.path.getsize(os.path.join(out, "e1_accuracy.png")) > 10_000


def _seeded_run(method, rank, accs, bits, **fields):
  """A seeded-run record with one curve per seed: accs[s][k] at cumulative uplink bits[k]."""
  return {"method": method, "rank": rank, "keep_ratio": 0.5, "seeds": list(range(len(accs))),
          **fields, "per_seed": [
              {"final_accuracy": a[-1], "final_accuracy_full": None, "cum_uplink_bits": bits[-1],
               "curve": {"round": [1, 2, 3], "test_accuracy": a, "cum_uplink_bits": bits}}
              for a in accs]}


def test_e1_head_only_run_is_the_same_whatever_ranks_are_asked(monkeypatch):
  """`--ranks=4` and `--ranks=4,8` must resume one head-only record, not clash on its
  fingerprint (the head-only config once took the last rank asked for)."""
  from experiments import reproduce as reproduce_lib
  from experiments import seeded
  planned = {}

  def plan(name, config, *_, **__):  # records each run's fingerprint instead of training
    planned.setdefault(name, []).append(seeded.fingerprint(config))
    return {}

  monkeypatch.setattr(reproduce_lib.seeded, "run", plan)
  monkeypatch.setattr(reproduce_lib.orthogonality, "run_variant", lambda *_, **__: {})
  for ranks in ((4,), (4, 8), (8,)):
    reproduce_lib.run_e1("test", 2, "ViT-B_16.npz", [0], "runs", "workdirs", ranks=ranks,
                         variants=())
  assert len(planned["head_only"]) == 3 and len(set(planned["head_only"])) == 1
  # ... while an adapted run does depend on its rank.
  assert len(set(planned["dense_r4"])) == 1 and not set(planned["dense_r4"]) & set(
      planned["dense_r8"])


def test_a_seed_run_alone_is_the_sweep_s_member_for_that_seed():
  # TSFA's seeds run one by one when they pick different ranks, and are paired with swept
  # rows: seed 3 alone must be member 3 of the sweep, data partition included (it was the
  # seed's own partition before, the sweep's base one in the sweep).
  from configs import tsfa as tsfa_config
  from experiments import seeded
  from softjax.config import sweep

  base = tsfa_config.get_config("controller=osfa,scale=test")
  assert base.seed == 0 and base.data.partition_seed == -1
  alone = seeded.with_seeds(base, [3]).to_dict()
  member = sweep.member_configs(seeded.with_seeds(base, [0, 3]))[1].to_dict()
  assert alone["seed"] == 3 and alone["data"]["partition_seed"] == 0
  assert alone == member


def test_e1_rows_compare_at_equal_uplink_and_to_a_target_by_hand():
  from experiments import reproduce as reproduce_lib
  mb = 8e6
  dense = _seeded_run("dense", 4, [[0.5, 0.6, 0.8], [0.5, 0.7, 0.8]], [2 * mb, 4 * mb, 6 * mb])
  soft = _seeded_run("soft", 4, [[0.4, 0.7, 0.78], [0.3, 0.5, 0.79]], [1 * mb, 2 * mb, 3 * mb],
                     variant="reorth")
  head = _seeded_run("head_only", 0, [[0.2, 0.3, 0.4], [0.2, 0.3, 0.5]], [0.1 * mb] * 3)
  rows = {r["label"]: r for r in reproduce_lib.e1_rows([dense, soft, head])}
  # Equal uplink B = 3 MB (SOFT's total): dense's last evaluation within it is at 2 MB.
  assert rows["dense"]["equal_uplink_mb"] == 3.0
  assert rows["dense"]["accuracy_at_equal_uplink"] == [0.5, 0.5]
  assert rows["soft/reorth"]["accuracy_at_equal_uplink"] == [0.78, 0.79]
  # Target 0.97 x 0.8 = 0.776: dense reaches it at 6 MB; SOFT at 3 MB in both seeds.
  assert rows["dense"]["target_accuracy"] == pytest.approx(0.776)
  assert rows["dense"]["mb_to_target"] == [6.0, 6.0]
  assert rows["soft/reorth"]["mb_to_target"] == [3.0, 3.0]
  assert rows["head_only"]["mb_to_target"] is None
  assert reproduce_lib._ci([3.0, None], ".2f") == "3.00 (1/2)"
  assert reproduce_lib._ci([None, None]) == "none of 2"
  # Dense diverged: no target, so no uplink-to-target column, and no traceback.
  rows = {r["label"]: r for r in reproduce_lib.e1_rows(
      [{"method": "dense", "rank": 4, "seeds": [0, 1], "diverged": "nan"}, soft, head])}
  assert rows["soft/reorth"]["mb_to_target"] is None
  assert "soft/reorth" in reproduce_lib.e1_table(list(rows.values()), {})
  assert reproduce_lib.e1_claims(list(rows.values()))
  assert reproduce_lib._ci([0.01, 0.03], "+.2f") == "+0.02 ± 0.13"  # the sign on the mean only


@pytest.mark.slow
def test_extending_a_cosine_schedule_is_refused(cache_dir, tmp_path):
  workdir = str(tmp_path / "cos")
  experiment.run(make_config(cache_dir, rounds=2, **{"fl.lr_schedule": "cosine"}), workdir)
  with pytest.raises(checkpointing.CheckpointError, match="lr_schedule"):
    experiment.run(make_config(cache_dir, rounds=3, **{"fl.lr_schedule": "cosine"}), workdir)


# ------------------------------------------------------------------------ the latency controller

OSFA = {"method.name": "soft", "method.zeta": 0.1, "controller.name": "osfa"}


@pytest.fixture(scope="module")
def osfa_run(cache_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("osfa"))
  return workdir, experiment.run(make_config(cache_dir, **OSFA), workdir)


@pytest.mark.slow
def test_osfa_rows_report_latency_and_the_queue_follows_them(osfa_run):
  workdir, summary = osfa_run
  rows = metrics_lib.read_rows(os.path.join(workdir, "metrics.jsonl"))
  tbar = summary["latency_budget_s"]
  assert tbar > 0 and summary["rank"] == 4
  queue = 0.0
  for r in rows:
    assert {"latency_s", "predicted_latency_s", "queue", "keep_ratio", "solver",
            "solver_time_s", "fallbacks"} <= set(r)
    assert r["solver"] == "cvx" and r["fallbacks"] == 0
    assert r["keep_ratio"] in (0.25, 0.5, 0.75, 1.0)
    # SOFT's realized payload is what the controller priced, so latency is as predicted.
    assert r["latency_s"] == pytest.approx(r["predicted_latency_s"], rel=1e-4)
    queue = max(queue + r["latency_s"] / tbar - 1.0, 0.0)
    assert r["queue"] == pytest.approx(queue, rel=1e-6, abs=1e-9)
  assert rows[0]["keep_ratio"] == 1.0  # empty queue: P3 ignores latency
  assert summary["max_queue"] > 0  # the dense first round overran a budget of half of it
  assert summary["round_traces"] == 1  # a new O_t and split every round, one compilation


@pytest.mark.slow
def test_osfa_run_resumes_with_its_queue(osfa_run, cache_dir, tmp_path):
  full_dir, _ = osfa_run
  workdir = str(tmp_path / "osfa_resumed")

  def crash_after_round_3(t):
    if t == 3:
      raise KeyboardInterrupt

  with pytest.raises(errors.Interrupted):  # Ctrl-C in the loop: one line, resumable
    experiment.run(make_config(cache_dir, **OSFA), workdir, on_round_end=crash_after_round_3)
  experiment.run(make_config(cache_dir, **OSFA), workdir)
  want = metrics_lib.read_rows(os.path.join(full_dir, "metrics.jsonl"))
  got = metrics_lib.read_rows(os.path.join(workdir, "metrics.jsonl"))
  assert comparable(got) == comparable(want)


@pytest.mark.slow
def test_tsfa_picks_the_rank_offline_with_a_pilot_spectrum(cache_dir, tmp_path):
  config = make_config(cache_dir, rounds=2, **{**OSFA, "controller.name": "tsfa",
                                               "controller.spectrum": "pilot",
                                               "controller.rank_candidates": "1,2,8"})
  summary = experiment.run(config, str(tmp_path / "tsfa"))
  offline = summary["offline"]
  assert set(offline["objective"]) == {1, 2, 8}
  assert summary["rank"] == offline["rank"] == min(offline["objective"],
                                                   key=offline["objective"].get)
  assert {leaf.shape[0] for leaf in jax.tree.leaves(summary["lora_template"])} >= {
      summary["rank"]}
  # Round 0 sends O_0 (at least one component).
  assert summary["rows"][0]["keep_ratio"] == max(offline["keep_ratio"], 1 / summary["rank"])


@pytest.mark.slow
def test_a_solver_failing_every_round_does_not_stop_the_run(cache_dir, tmp_path, monkeypatch):
  def broken(self, bits, snr_coeff, compute_s):
    raise RuntimeError("injected solver failure")

  monkeypatch.setattr(solvers.MinLatencyProblem, "solve", broken)
  summary = experiment.run(make_config(cache_dir, rounds=3, **OSFA), str(tmp_path / "broken"))
  assert [r["solver"] for r in summary["rows"]] == ["numpy"] * 3
  assert [r["fallbacks"] for r in summary["rows"]] == [1, 1, 1]
  assert summary["final_accuracy"] is not None


@pytest.mark.slow
def test_e2_driver_runs_seeded_ranks_and_checks_rbar(cache_dir, tmp_path):
  out = reproduce(cache_dir, str(tmp_path / "e2"), "e2", "--rounds=3", "--ranks=1,4",
                  "--seeds=0,1")
  # TSFA's runs are named by candidates, and by J(r)'s price of a dropped component unless it
  # is the default.
  assert sorted(os.listdir(os.path.join(out, "runs"))) == [
      "e2_osfa_r1.json", "e2_osfa_r4.json", "e2_tsfa_1_4.json", "e2_tsfa_1_4_in_flight.json"]
  rows = json.load(open(os.path.join(out, "e2.json")))
  assert [(r["label"], r["rank"]) for r in rows] == [
      ("osfa", 1), ("osfa", 4), ("tsfa", None), ("tsfa in_flight", None)]
  tsfa_row, in_flight_row = rows[-2:]
  for row in (tsfa_row, in_flight_row):
    assert len(row["seed_ranks"]) == 2 and set(row["seed_ranks"]) <= {1, 4}
    assert row["in_tied"] == [k in row["tied_ranks"] for k in row["seed_ranks"]]
  for r in rows:
    assert len(r["final_accuracy"]) == 2 and all(len(q) == 3 for q in r["queue"])
  for r in rows[:2] + rows[3:]:  # paired by seed against TSFA at the default price
    assert r["tsfa_minus_this"] == pytest.approx(
        [t - a for t, a in zip(tsfa_row["final_accuracy"], r["final_accuracy"])])
  assert tsfa_row["tsfa_minus_this"] is None
  assert json.load(open(os.path.join(out, "runs", "e2_tsfa_1_4_in_flight.json")))[
      "sparsification_cost"] == "in_flight"
  assert "| tsfa in_flight |" in open(os.path.join(out, "e2.md")).read()
  run = json.load(open(os.path.join(out, "runs", "e2_tsfa_1_4.json")))
  assert set(run["per_seed"][0]["offline"]["objective"]) == {"1", "4"}  # JSON keys
  # One budget per seed for every run: a fraction of the same dense reference on that seed's
  # channel (the seed places the clients).
  budgets = {tuple(s["latency_budget_s"] for s in json.load(open(
      os.path.join(out, "runs", name)))["per_seed"]) for name in os.listdir(
      os.path.join(out, "runs"))}
  assert len(budgets) == 1
  claims = json.load(open(os.path.join(out, "summary.json")))
  assert {c["metric"] for c in claims if c["method"] == "tsfa"} >= {"final_accuracy", "rbar"}
  assert os.path.getsize(os.path.join(out, "e2_rank.png")) > 10_000
  assert "rbar " in open(os.path.join(out, "e2.md")).read()


def test_ranks_tied_with_the_best_by_hand():
  from experiments import reproduce as reproduce_lib
  fixed = [{"rank": k, "per_seed": [{"final_accuracy": a} for a in accs]}
           for k, accs in ((2, [0.60, 0.61, 0.62]), (4, [0.70, 0.71, 0.72]),
                           (8, [0.69, 0.72, 0.70]))]
  # 8 (mean 0.7033) is within noise of 4 (0.71); 2 is 10 points below with the same spread.
  assert reproduce_lib.tied_with_best(fixed) == (4, [4, 8])
  assert stats.welch_p([0.5, 0.5], [0.5, 0.5]) == 1.0
  assert stats.welch_p([0.5, 0.5], [0.6, 0.6]) == 0.0
  # Welch by hand: means 2 and 5, variances 1 and 1, n = 3 each: t = 3 / sqrt(2/3) = 3.674,
  # df = 4: two-sided p = 0.0213.
  assert stats.welch_p([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == pytest.approx(0.0213, abs=2e-4)


@pytest.mark.slow
def test_e4_driver_reports_seeded_bits_to_target(cache_dir, tmp_path):
  out = reproduce(cache_dir, str(tmp_path / "e4"), "e4", "--rounds=3", "--target=0.01",
                  "--seeds=0,1")
  dense, tsfa_row = json.load(open(os.path.join(out, "e4.json")))
  assert (dense["method"], tsfa_row["method"]) == ("dense", "soft+tsfa")
  runs = [json.load(open(os.path.join(out, "runs", f"{n}.json")))
          for n in ("e4_dense", "e4_soft_tsfa")]
  for row, run in zip((dense, tsfa_row), runs):
    # A target of 1 % is met at the first evaluation (every round at test scale).
    assert row["target_accuracy"] == 0.01 and row["rounds_to_target"] == [1, 1]
    assert row["mb_to_target"] == [s["curve"]["cum_uplink_bits"][0] / 8e6
                                   for s in run["per_seed"]]
  # The saving is paired by seed (same channel and clients).
  assert tsfa_row["saving_percent"] == pytest.approx(
      [100 * (1 - t / d) for t, d in zip(tsfa_row["mb_to_target"], dense["mb_to_target"])])
  assert min(tsfa_row["saving_percent"]) > 0  # a budget of half the dense latency sends less
  claims = json.load(open(os.path.join(out, "summary.json")))
  assert {c["metric"] for c in claims if c["method"] == "soft+tsfa"} >= {
      "saving_percent", "mb_to_target_0.0100"}
  assert os.path.getsize(os.path.join(out, "e4_bits.png")) > 10_000


@pytest.mark.slow
def test_e3_driver_reports_seeded_covariance_per_partition(cache_dir, tmp_path):
  out = reproduce(cache_dir, str(tmp_path / "e3"), "e3", "--rounds=2", "--seeds=0,1")
  rows = json.load(open(os.path.join(out, "e3.json")))
  assert [r["shards_per_client"] for r in rows] == [1, "iid"]
  for r in rows:
    assert r["seeds"] == [0, 1] and len(r["final_accuracy"]) == 2
    assert all(len(c) == 2 for c in r["cov_term"]) and min(r["mean_cov_term"]) > 0
  claims = json.load(open(os.path.join(out, "summary.json")))
  assert {c["method"] for c in claims} == {"soft/shards=1", "soft/shards=iid"}
  assert os.path.getsize(os.path.join(out, "e3_covariance.png")) > 10_000


@pytest.mark.slow
def test_e5_driver_runs_the_grid_and_seeds_as_one_sweep(cache_dir, tmp_path):
  out = reproduce(cache_dir, str(tmp_path / "e5"), "e5", "--rounds=2", "--seeds=0,1")
  rows = json.load(open(os.path.join(out, "e5.json")))
  assert [(r["zeta"], r["V"]) for r in rows] == [(0.0, 0.5), (0.0, 4.0), (0.5, 0.5),
                                                  (0.5, 4.0)]
  assert all(r["seeds"] == [0, 1] for r in rows)
  metrics = metrics_lib.read_rows(os.path.join(out, "e5_grid", "metrics.jsonl"))
  assert len(metrics) == 2 * 4 * 2  # one workdir, one row per member (setting x seed) and round
  run = json.load(open(os.path.join(out, "runs", "e5_grid.json")))
  for row in rows:  # each row's seeds are its own setting's members
    mine = [s for s in run["per_seed"] if (s["setting"]["zeta"], s["setting"]["V"]) == (
        row["zeta"], row["V"])]
    assert row["final_accuracy"] == [s["final_accuracy"] for s in mine]
  assert os.path.getsize(os.path.join(out, "e5_grid.png")) > 10_000


@pytest.mark.slow
def test_e6_driver_compares_impairments_with_perfect_csi_per_seed(cache_dir, tmp_path):
  out = reproduce(cache_dir, str(tmp_path / "e6"), "e6", "--rounds=3", "--seeds=0,1")
  rows = json.load(open(os.path.join(out, "e6.json")))
  assert [r["condition"] for r in rows] == ["perfect", "bursty", "csi_error_0.3",
                                            "dropout_0.2"]
  assert rows[0]["accuracy_vs_perfect"] == [0.0, 0.0]
  for r in rows:  # paired by seed
    assert r["accuracy_vs_perfect"] == pytest.approx(
        [a - b for a, b in zip(r["final_accuracy"], rows[0]["final_accuracy"])])
    assert all(len(q) == 3 for q in r["queue"])
  metrics = {r["condition"]: metrics_lib.read_rows(os.path.join(out, f"e6_{r['condition']}",
                                                                "metrics.jsonl"))
             for r in rows}
  # Perfect CSI: the controller predicts the realized latency; a 30 % gain error breaks that.
  assert all(r["latency_s"] == pytest.approx(r["predicted_latency_s"], rel=1e-4)
             for r in metrics["perfect"])
  assert any(r["latency_s"] != pytest.approx(r["predicted_latency_s"], rel=1e-3)
             for r in metrics["csi_error_0.3"])
  assert os.path.getsize(os.path.join(out, "e6_robustness.png")) > 10_000


def test_all_gathers_every_experiment_into_one_report(tmp_path, monkeypatch):
  """--experiment=all runs E1-E6 in DIR/eN and gathers their tables and plots (each driver
  is tested above; here a stand-in records the calls so the gathering is checked alone)."""
  from experiments import reproduce as reproduce_lib

  calls = []

  def fake_run_experiment(name, out, scale, rounds, checkpoint, root):
    assert root == str(tmp_path)  # run summaries and claims gathered at the top
    calls.append((name, out, scale, rounds))
    return f"| table of {name} |\n", f"{name}.png"

  monkeypatch.setattr(reproduce_lib, "run_experiment", fake_run_experiment)
  report = reproduce_lib.run_all(str(tmp_path), "test", 2, "unused.npz")
  assert [c[0] for c in calls] == ["e1", "e2", "e3", "e4", "e5", "e6", "e7"]
  assert all(c[1] == str(tmp_path / c[0]) and c[2:] == ("test", 2) for c in calls)
  for name in ("e1", "e6"):
    assert f"| table of {name} |" in report and f"![{name}]({name}/{name}.png)" in report
  assert open(tmp_path / "report.md").read() == report


@pytest.mark.slow
@pytest.mark.parametrize("method", ["tlora", "slora"])
def test_other_sparsifiers_run_under_the_same_controller(method, cache_dir, tmp_path):
  """The controller prices each method's own payload: the realized latency is the predicted."""
  summary = experiment.run(make_config(cache_dir, rounds=2, **{**OSFA, "method.name": method,
                                                                "method.zeta": 0.0}),
                           str(tmp_path / method))
  for r in summary["rows"]:
    assert r["solver"] == "cvx" and r["keep_ratio"] in (0.25, 0.5, 0.75, 1.0)
    assert r["latency_s"] == pytest.approx(r["predicted_latency_s"], rel=1e-4)


def test_last_round_adds_the_whole_split_from_the_same_pass(cache_dir, tmp_path):
  """With an evaluation subset the last row also has the whole split's accuracy; its subset
  number is the one the subset pass gives (same examples in the same batches)."""
  both = experiment.run(make_config(cache_dir, rounds=4, **{"eval.num_examples": 40}),
                        str(tmp_path / "both"))
  subset = experiment.run(make_config(cache_dir, rounds=4, **{"eval.num_examples": 40,
                                                              "eval.final_full": False}),
                          str(tmp_path / "subset"))
  last, plain = both["rows"][-1], subset["rows"][-1]
  assert last["test_accuracy"] == plain["test_accuracy"] == subset["final_accuracy"]
  assert "test_accuracy_full" not in plain and subset["final_accuracy_full"] is None
  assert both["final_accuracy_full"] == last["test_accuracy_full"]
  middle = both["rows"][1]  # round 2: an intermediate evaluation reads the subset only
  assert "test_accuracy" in middle and "test_accuracy_full" not in middle
  # The whole split is not the subset: digits' test split has 360 examples.
  whole = experiment.run(make_config(cache_dir, rounds=4), str(tmp_path / "whole"))
  assert last["test_accuracy_full"] == whole["final_accuracy"]
  assert whole["final_accuracy_full"] is None  # no subset, nothing more to report


def test_e7_plan_runs_every_rule_fixed_and_under_tsfa_and_soft_both_ways():
  from experiments import e7
  from softjax.config import choices
  names = [name for name, _, _ in e7.plan("test", 2, "unused.npz")]
  assert names == ([f"e7_{r}" for r in choices.AGGREGATION_RULES] + ["e7_soft", "e7_soft_tsfa"]
                   + [f"e7_{r}_tsfa" for r in e7.TSFA_RULES])
  assert "hetlora" not in e7.TSFA_RULES and len(e7.TSFA_RULES) == len(choices.AGGREGATION_RULES) - 1
  assert e7.tsfa_rules(("hetlora", "ffa", "fedit")) == ("fedit", "ffa")
  some = {name: (config, meta) for name, config, meta in e7.plan("test", 2, "x", ("fedsa",))}
  assert list(some) == ["e7_fedsa", "e7_soft", "e7_soft_tsfa", "e7_fedsa_tsfa"]
  assert some["e7_fedsa_tsfa"][0].controller.name == "tsfa"
  assert some["e7_fedsa_tsfa"][0].method.rule == some["e7_fedsa"][0].method.rule == "fedsa"
  assert some["e7_soft"][1] == {"method": "soft", "rank": e7.RANK, "keep_ratio": e7.KEEP_RATIO}


def test_e7_driver_refuses_an_unknown_rule_in_one_line(tmp_path):
  done = subprocess.run([sys.executable, "-m", "experiments.reproduce", "--experiment=e7",
                         "--scale=test", f"--out={tmp_path}", "--rules=fedit,fedavg"],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert done.returncode != 0 and "Traceback" not in done.stderr
  assert "--rules has unknown names ['fedavg']" in done.stderr
  empty = subprocess.run([sys.executable, "-m", "experiments.reproduce", "--experiment=e7",
                          "--scale=test", f"--out={tmp_path}", "--rules="],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
  assert empty.returncode != 0 and "Traceback" not in empty.stderr
  assert "--rules is empty" in empty.stderr


@pytest.mark.slow
def test_e7_driver_runs_rules_and_soft_as_seeded_runs(cache_dir, tmp_path):
  # Three rules (the default runs all nine: test_e7_plan_runs_every_rule...), SOFT, SOFT + TSFA,
  # the two rules that have a TSFA row under TSFA, and their budget replays.
  out = reproduce(cache_dir, str(tmp_path / "e7"), "e7", "--rounds=2", "--seeds=0,1",
                  "--rules=fedit,ffa,hetlora", timeout=1200)
  from experiments import e7
  assert sorted(os.listdir(os.path.join(out, "runs"))) == sorted(
      ["e7_fedit.json", "e7_ffa.json", "e7_hetlora.json", "e7_soft.json", "e7_soft_tsfa.json",
       "e7_fedit_tsfa.json", "e7_ffa_tsfa.json"])
  rows = {r["label"]: r for r in json.load(open(os.path.join(out, "e7.json")))}
  assert set(rows) == {"fedit", "ffa", "hetlora", "soft", "soft+tsfa", "fedit+tsfa", "ffa+tsfa"}
  for r in rows.values():
    assert len(r["final_accuracy"]) == 2 and len(r["accuracy_at_equal_uplink"]) == 2
  # A frozen factor is not uploaded: FFA sends less than FedIT, and leaves no covariance term.
  assert max(rows["ffa"]["uplink_mb"]) < min(rows["fedit"]["uplink_mb"])
  assert max(rows["ffa"]["mean_cov_term"]) < 1e-4 < min(rows["fedit"]["mean_cov_term"])
  # HetLoRA's clients at ranks 2/4/8 send less than FedIT's, all at rank 8.
  assert max(rows["hetlora"]["uplink_mb"]) < min(rows["fedit"]["uplink_mb"])
  claims = json.load(open(os.path.join(out, "summary.json")))
  assert {c["method"] for c in claims if c["experiment"] == "e7"} == set(rows)
  assert "| hetlora |" in open(os.path.join(out, "e7.md")).read()
  assert os.path.getsize(os.path.join(out, "e7_rules.png")) > 10_000
  # The budget question, replayed without training: its TSFA rank at the default quantile and
  # the latency that rank gives are the TSFA rows' own.
  budget = {b["rule"]: b for b in json.load(open(os.path.join(out, "e7_budget.json")))}
  assert tuple(budget) == ("fedit", "ffa")
  for rule, b in budget.items():
    median = next(t for t in b["tsfa"] if t["quantile"] == 0.5)
    assert median["rank"] == rows[f"{rule}+tsfa"]["seed_ranks"]
    assert median["latency_over_budget"] == pytest.approx(
        rows[f"{rule}+tsfa"]["latency_over_budget"], rel=1e-4)
    ranks = [int(r) for r in b["latency_over_budget_at_rank"]]
    assert all(t["rank"][0] in ranks for t in b["tsfa"])
  assert "TSFA q = 0.0" in open(os.path.join(out, "e7.md")).read()
  assert os.path.getsize(os.path.join(out, "e7_cov.png")) > 10_000
  some = [json.load(open(os.path.join(out, "runs", f"e7_{n}.json")))
          for n in ("fedit", "ffa_tsfa", "soft")]
  assert [r["label"] for r in e7.covariance_rows(some)] == ["fedit", "soft"]  # fixed runs only
