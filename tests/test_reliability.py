"""Bad inputs and faults: each ends in one clear error or a logged fallback, never in a silent
wrong result, and never costs the last good checkpoint. docs/reliability.md is the table of
cases, with the tests elsewhere that cover the rest."""

import errno
import glob
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments import common
from softjax import config as config_lib
from softjax import errors
from softjax.data import sources
from softjax.errors import WorkdirError
from softjax.federated import schedule
from softjax.run import checkpointing, experiment
from softjax.run import metrics as metrics_lib
from softjax.run import workdir as workdir_lib
from softjax.tsfa import controller as controller_lib
from softjax.tsfa import online, solvers
from softjax.wireless import channel as channel_lib
from softjax.wireless import link as link_lib
from tests import support
from tests.support import comparable, make_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROUNDS = 6  # the reference run: checkpoints every 2 rounds, the newest 2 kept (steps 4 and 6)
OSFA = {"method.name": "soft", "method.zeta": 0.1, "controller.name": "osfa"}


@pytest.fixture(scope="module")
def reference(cache_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("reference"))
  summary = experiment.run(make_config(cache_dir), workdir)
  return workdir, summary


def rows_of(workdir):
  return metrics_lib.read_rows(os.path.join(workdir, "metrics.jsonl"))


def steps_in(workdir):
  """The step directories of a workdir's checkpoints, as ints (finalized steps only)."""
  directory = os.path.join(workdir, "checkpoints")
  names = os.listdir(directory) if os.path.isdir(directory) else []
  return sorted(int(n) for n in names if n.isdigit())


def newest_step(workdir):
  return max(steps_in(workdir), default=0)


def copy_of(workdir, tmp_path, name="copy"):
  target = str(tmp_path / name)
  shutil.copytree(workdir, target)
  return target


def flip_a_byte(path):
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0xFF
  open(path, "wb").write(bytes(data))


# ------------------------------------------------------------------- 1. config rules with no case

# (overrides, field, text of the message) for the rules tests/test_config.py::RULES has no case
# for; every other rule is covered there.
EXTRA_RULES = [
    ({"wireless.min_distance_m": 0.0}, "wireless.min_distance_m", "must be a finite number > 0"),
    ({"wireless.burst_p_good": 1.5}, "wireless.burst_p_good", "must be a finite number in [0, 1]"),
    ({"wireless.burst_p_bad": 0.0, "wireless.burst_p_good": 0.0}, "wireless.burst_p_good",
     "must be > 0 when wireless.burst_p_bad is 0"),
    ({"controller.lambda_sp": -1.0}, "controller.lambda_sp", "must be a finite number >= 0"),
    ({"controller.sparsification_cost": "all"}, "controller.sparsification_cost",
     "must be one of dropped, in_flight"),
    ({"controller.name": "tsfa", "controller.sparsification_cost": "in_flight",
      "method.error_feedback": False}, "controller.sparsification_cost",
     "assumes error feedback (method.error_feedback is false); use 'dropped'"),
    ({"mesh.devices": -1}, "mesh.devices", "(0 = every device, 1 = no mesh)"),
    ({"mesh.num_processes": -1}, "mesh.num_processes", "(0 = detect)"),
    ({"mesh.process_id": -2}, "mesh.process_id", "(-1 = detect)"),
    ({"mesh.num_processes": 2, "mesh.process_id": 2}, "mesh.process_id",
     "must be below mesh.num_processes (2)"),
    ({"mesh.devices": 0, "mesh.shard_data": True, "sweep.zeta": "0,0.1"}, "mesh.shard_data",
     "must be False with a sweep"),
]


@pytest.mark.parametrize("overrides,field,allowed", EXTRA_RULES,
                         ids=["-".join(sorted(r[0])) for r in EXTRA_RULES])
def test_rules_without_a_case_in_test_config_name_their_field(overrides, field, allowed):
  config = support.with_overrides(support.make_testing_config(), overrides)
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.validate(config)
  assert err.value.field == field
  assert str(err.value).startswith(f"config.{field} = ") and allowed in str(err.value)


# ----------------------------------------------------------------------- 2. damaged data files


def write_fashion_mnist(directory):
  """Four valid, tiny idx files (6 train and 4 test images) in the official layout."""
  rng = np.random.default_rng(0)
  for prefix, n in (("train", 6), ("t10k", 4)):
    support.write_idx(str(directory / f"{prefix}-images-idx3-ubyte.gz"),
               rng.integers(0, 256, (n, 28, 28)), 0x08, np.uint8)
    support.write_idx(str(directory / f"{prefix}-labels-idx1-ubyte.gz"), np.arange(n) % 10, 0x08,
               np.uint8)


DAMAGES = {
    "truncated": lambda raw: raw[:len(raw) // 2],
    "not_gzip": lambda raw: b"<html>404 Not Found</html>",
    "flipped_byte": lambda raw: raw[:len(raw) // 2] + bytes([raw[len(raw) // 2] ^ 0xFF])
                                + raw[len(raw) // 2 + 1:],
    "empty": lambda raw: b"",
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_fashion_mnist_file_is_named_with_the_fix(damage, tmp_path, monkeypatch):
  write_fashion_mnist(tmp_path)
  path = tmp_path / "train-images-idx3-ubyte.gz"
  path.write_bytes(DAMAGES[damage](path.read_bytes()))
  monkeypatch.setenv(sources.FASHION_MNIST_ENV, str(tmp_path))
  with pytest.raises(sources.DatasetCorruptError) as err:
    sources.load_dataset("fashion_mnist")
  message = str(err.value)
  assert message.startswith(f"{path}: ")
  assert "apt-get install --reinstall dataset-fashion-mnist" in message
  assert isinstance(err.value, FileNotFoundError)  # the launcher reports it in one line


def test_one_missing_fashion_mnist_file_is_listed(tmp_path, monkeypatch):
  write_fashion_mnist(tmp_path)
  os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
  monkeypatch.setenv(sources.FASHION_MNIST_ENV, str(tmp_path))
  with pytest.raises(sources.DatasetNotFoundError,
                     match=r"\(missing: t10k-labels-idx1-ubyte.gz\)\. .*apt-get install "
                           r"dataset-fashion-mnist"):
    sources.load_dataset("fashion_mnist")


def test_damaged_dataset_stops_the_launcher_in_one_line(cache_dir, tmp_path, monkeypatch):
  write_fashion_mnist(tmp_path)
  flip_a_byte(tmp_path / "t10k-images-idx3-ubyte.gz")
  monkeypatch.setenv(sources.FASHION_MNIST_ENV, str(tmp_path))
  config = make_config(cache_dir, **{"data.name": "fashion_mnist"})
  with pytest.raises(SystemExit) as err:
    common.exit_on_user_error(experiment.run, config, str(tmp_path / "w"))
  assert str(err.value).startswith(f"error: {tmp_path}/t10k-images-idx3-ubyte.gz: cannot be "
                                   "read, the file is truncated or damaged")


# ------------------------------------------------- 3. a checkpoint of another model or target set


@pytest.mark.slow
def test_resume_with_other_lora_targets_lists_the_arrays(reference, cache_dir):
  workdir, _ = reference
  config = make_config(cache_dir, **{"lora.targets": "query,key,value"})
  with pytest.raises(checkpointing.CheckpointError) as err:
    experiment.run(config, workdir)
  message = str(err.value)
  assert "does not match this run's model" in message
  # 2 blocks x (A, B) of the new key projection, nothing else.
  missing = re.findall(r"missing in checkpoint: (\S+)", message)
  assert len(missing) == 4 and all("key" in k for k in missing)
  assert steps_in(workdir) == [4, 6]  # the refused checkpoints are left as they were


@pytest.mark.slow
def test_resume_with_another_model_size_lists_the_shapes(reference, cache_dir):
  workdir, _ = reference
  config = make_config(cache_dir, **{"model.variant": "cpu_small", "model.backbone": "random"})
  with pytest.raises(checkpointing.CheckpointError) as err:
    experiment.run(config, workdir)
  message = str(err.value)
  # tiny: width 16, depth 2; cpu_small: width 128, depth 6; rank 4 either way.
  block0 = "lora/Transformer/encoderblock_0/MultiHeadDotProductAttention_1"
  assert f"{block0}/query/B: checkpoint (16, 4) vs model (128, 4)" in message
  assert "head/kernel: checkpoint (16, 10) vs model (128, 10)" in message
  assert "missing in checkpoint: lora/Transformer/encoderblock_5" in message
  assert steps_in(workdir) == [4, 6]


# ------------------------------------------------------ 4. half-written and damaged checkpoints


@pytest.mark.slow
def test_half_written_save_is_ignored(reference, cache_dir, tmp_path, capsys):
  """Killed inside the save of step 6: orbax's tmp dir holds part of it, and is never read."""
  workdir = copy_of(reference[0], tmp_path)
  half = os.path.join(workdir, "checkpoints", "6.orbax-checkpoint-tmp")
  os.rename(os.path.join(workdir, "checkpoints", "6"), half)
  os.remove(os.path.join(half, "state", "manifest.ocdbt"))
  summary = experiment.run(make_config(cache_dir), workdir)
  assert "after 4 completed rounds" in capsys.readouterr().out
  assert comparable(summary["rows"]) == comparable(reference[1]["rows"])
  # Saving step 6 again replaced the tmp dir; step 4 was never touched.
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "6"]


@pytest.mark.slow
def test_row_cut_off_mid_write_is_recomputed(reference, cache_dir, tmp_path):
  """Killed while writing the row of round 6 (before its save): the cut line is dropped."""
  workdir = copy_of(reference[0], tmp_path)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))
  path = os.path.join(workdir, "metrics.jsonl")
  lines = open(path).read().splitlines(keepends=True)
  open(path, "w").write("".join(lines[:5]) + lines[5][:len(lines[5]) // 2])
  summary = experiment.run(make_config(cache_dir), workdir)
  assert comparable(rows_of(workdir)) == comparable(reference[1]["rows"])
  assert summary["final_accuracy"] == reference[1]["final_accuracy"]


def _damage(kind):
  def damage(step_dir):
    if kind == "empty_dir":
      shutil.rmtree(step_dir)
      os.mkdir(step_dir)
      return
    pattern, how = kind.split(":")
    paths = glob.glob(os.path.join(step_dir, pattern))
    assert paths, f"nothing matches {pattern} in {step_dir}"
    for path in paths:
      if how == "flip":
        flip_a_byte(path)
      elif how == "truncate":
        open(path, "wb").write(open(path, "rb").read()[:10])
      else:
        os.remove(path)
  return damage


DAMAGED_STEPS = ["state/d/*:flip", "state/d/*:truncate", "state/manifest.ocdbt:delete",
                 "state/_METADATA:truncate", "host/metadata:truncate", "empty_dir"]


# Orbax leaves an asyncio callback behind when a restore fails; it is noise, not a result.
ORBAX_NOISE = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@ORBAX_NOISE
@pytest.mark.parametrize("kind", DAMAGED_STEPS)
def test_unreadable_step_falls_back_to_the_previous(kind, tmp_path, caplog):
  import jax.numpy as jnp

  directory = str(tmp_path / "checkpoints")
  ckpt = checkpointing.RunCheckpointer(directory, every=1, keep=3)
  for step in (1, 2):
    ckpt.save(step, {"w": jnp.arange(4.0) * step}, {"step": step})
  ckpt.close()
  _damage(kind)(os.path.join(directory, "2"))
  ckpt = checkpointing.RunCheckpointer(directory, every=1, keep=3)
  with caplog.at_level(logging.WARNING):
    step, state, host = ckpt.restore_latest({"w": jnp.zeros(4)})
  assert (step, host) == (1, {"step": 1})
  np.testing.assert_array_equal(state["w"], [0.0, 1.0, 2.0, 3.0])
  assert f"checkpoint {directory}/2 could not be read" in caplog.text
  assert sorted(os.listdir(directory)) == ["1", "2.unreadable"]  # kept, not deleted
  ckpt.save(2, {"w": jnp.full(4, 7.0)}, {"step": 2})  # the resumed run saves step 2 again
  assert ckpt.restore_latest({"w": jnp.zeros(4)})[0] == 2
  ckpt.close()


@pytest.mark.slow
@ORBAX_NOISE
def test_corrupt_newest_checkpoint_resumes_from_the_previous_one(reference, cache_dir, tmp_path,
                                                                 caplog, capsys):
  workdir = copy_of(reference[0], tmp_path)
  step6 = os.path.join(workdir, "checkpoints", "6")
  for path in glob.glob(os.path.join(step6, "state", "d", "*")):
    flip_a_byte(path)
  with caplog.at_level(logging.WARNING):
    summary = experiment.run(make_config(cache_dir), workdir)
  assert f"checkpoint {step6} could not be read (ValueError: DATA_LOSS" in caplog.text
  assert "after 4 completed rounds" in capsys.readouterr().out
  assert comparable(rows_of(workdir)) == comparable(reference[1]["rows"])
  assert summary["final_accuracy"] == reference[1]["final_accuracy"]
  assert steps_in(workdir) == [4, 6] and os.path.isdir(step6 + ".unreadable")


@ORBAX_NOISE
def test_no_readable_checkpoint_is_one_error_and_renames_nothing(reference, cache_dir, tmp_path):
  workdir = copy_of(reference[0], tmp_path)
  for step in (4, 6):
    flip_a_byte(os.path.join(workdir, "checkpoints", str(step), "host", "metadata"))
  rows_before = rows_of(workdir)
  with pytest.raises(SystemExit) as err:
    common.exit_on_user_error(experiment.run, make_config(cache_dir), workdir)
  message = str(err.value)
  directory = os.path.join(workdir, "checkpoints")
  assert message.startswith(f"error: no checkpoint in {directory} can be read:")
  assert f"{directory}/6 could not be read" in message
  assert f"{directory}/4 could not be read" in message
  assert message.endswith("or use a new --workdir.")
  assert steps_in(workdir) == [4, 6] and sorted(os.listdir(directory)) == ["4", "6"]
  assert rows_of(workdir) == rows_before  # metrics.jsonl untouched


# ---------------------------------------------------------------- 5. a workdir that is not one


@pytest.mark.parametrize("where", ["under_a_file", "is_a_file"])
def test_unwritable_workdir_is_one_error_before_setup(where, cache_dir, tmp_path, monkeypatch):
  a_file = tmp_path / "results.txt"
  a_file.write_text("not a directory")
  workdir = str(a_file / "run") if where == "under_a_file" else str(a_file)

  def no_setup(config):
    raise AssertionError("the workdir must be checked before any setup")

  monkeypatch.setattr(experiment, "build_setup", no_setup)
  with pytest.raises(SystemExit) as err:
    common.exit_on_user_error(experiment.run, make_config(cache_dir), workdir)
  code = errno.ENOTDIR if where == "under_a_file" else errno.EEXIST
  assert str(err.value) == (f"error: --workdir {workdir} is not a writable directory ([Errno "
                            f"{code}] {os.strerror(code)}: '{workdir}'); choose another --workdir")


# --------------------------------------------------------------------- 6. a non-finite loss


def diverge_in_round_3(monkeypatch):
  """An infinite client learning rate in round 3 only (the rate is traced: no recompile)."""
  original = schedule.client_lr_at
  monkeypatch.setattr(schedule, "client_lr_at",
                      lambda t, *args: math.inf if t == 2 else original(t, *args))


@pytest.mark.slow
def test_nan_loss_stops_the_run_and_the_good_checkpoints_resume(reference, cache_dir, tmp_path,
                                                                monkeypatch):
  workdir = str(tmp_path / "nan")
  config = make_config(cache_dir, **{"checkpoint.every": 1})
  diverge_in_round_3(monkeypatch)
  with pytest.raises(experiment.NonFiniteLossError,
                     match=r"^round 3: training loss is nan; the last good checkpoint in .* is "
                           r"kept\. Lower fl\.client_lr \(now 0\.1\)\.$"):
    experiment.run(config, workdir)
  assert steps_in(workdir) == [1, 2]  # nothing of round 3 was saved
  assert comparable(rows_of(workdir)) == comparable(reference[1]["rows"][:2])
  monkeypatch.undo()
  summary = experiment.run(config, workdir)
  assert comparable(summary["rows"]) == comparable(reference[1]["rows"])
  assert summary["final_accuracy"] == reference[1]["final_accuracy"]


@pytest.mark.slow
def test_nan_state_with_a_finite_loss_is_not_checkpointed(cache_dir, tmp_path, monkeypatch):
  """With one local step the loss of round 3 is taken before its (infinite) update: finite. The
  state after it is not, and must not replace a good checkpoint."""
  workdir = str(tmp_path / "nan_state")
  diverge_in_round_3(monkeypatch)
  with pytest.raises(experiment.NonFiniteLossError,
                     match=r"^round 3: the run state has NaN/inf values in \[.*\(the "
                           r"training loss was still finite\); it is not checkpointed"):
    experiment.run(make_config(cache_dir, **{"checkpoint.every": 1, "fl.local_steps": 1}),
                   workdir)
  rows = rows_of(workdir)
  assert [r["round"] for r in rows] == [1, 2, 3] and np.isfinite(rows[2]["train_loss"])
  assert steps_in(workdir) == [1, 2]


# ------------------------------------------------- 7. a solver that raises or returns garbage


def plan_with(monkeypatch, cvx_answer):
  """The osfa controller's plan for round 2 (queue 1) with MinLatencyProblem.solve replaced."""
  monkeypatch.setattr(solvers.MinLatencyProblem, "solve", lambda self, bits, a, c: cvx_answer(a))
  ctrl = support.make_controller("osfa", solver="cvx")
  scores = [1.0 / np.arange(1, support.RANK + 1)] * len(support.LAYERS)
  plan, state = ctrl.plan(support.controller_state(queue=1.0), 2,
                          schedule.sample_clients(0, 2, support.N, support.K), scores)
  return state, plan


def twin_plan():
  ctrl = support.make_controller("osfa", solver="numpy")
  scores = [1.0 / np.arange(1, support.RANK + 1)] * len(support.LAYERS)
  return ctrl.plan(support.controller_state(queue=1.0), 2,
                   schedule.sample_clients(0, 2, support.N, support.K), scores)[0]


def assert_valid(plan, total_bw_hz=1e6, k=support.K, rank=support.RANK):
  assert 0 < plan.keep_ratio <= 1 and plan.m == round(plan.keep_ratio * rank)
  assert plan.bandwidth_hz.shape == (k,) and np.all(plan.bandwidth_hz > 0)
  assert plan.bandwidth_hz.sum() <= total_bw_hz * (1 + 1e-9)


K = support.K
GARBAGE = {  # what the "CVX" solve returns -> the reason the chain logs
    "nan_bandwidth": (lambda a: (0.1, np.full(K, np.nan)), "finite values"),
    "negative_bandwidth": (lambda a: (0.1, np.array([-1e5, 3e5, 3e5, 3e5, 2e5])),
                           "non-positive share"),
    "over_the_band": (lambda a: (0.01, np.full(K, 1e6)), "sums to 5e+06 Hz > B_tot 1e+06 Hz"),
    "wrong_shape": (lambda a: (0.1, np.full(K - 1, 1e6 / (K - 1))), "must be 5 finite values"),
    "nan_latency": (lambda a: (math.nan, np.full(K, 2e5)), "non-finite latency"),
}


@pytest.mark.parametrize("garbage", GARBAGE)
def test_garbage_from_the_cvx_solver_falls_back_to_the_twin(garbage, monkeypatch, caplog):
  answer, reason = GARBAGE[garbage]
  with caplog.at_level(logging.WARNING):
    state, plan = plan_with(monkeypatch, answer)
  assert (plan.solver, plan.fallbacks, state.fallbacks) == ("numpy", 1, 1)
  assert "TSFA solver failed, falling back: cvx: SolverFailure" in caplog.text
  assert reason in caplog.text
  assert_valid(plan)
  want = twin_plan()  # exactly what the twin alone decides
  assert plan.m == want.m
  np.testing.assert_array_equal(plan.bandwidth_hz, want.bandwidth_hz)


@pytest.mark.parametrize("bad_m", [0, support.RANK + 1])
def test_a_keep_ratio_outside_0_1_from_a_stage_falls_back(bad_m, monkeypatch, caplog):
  """A stage answering m = 0 (O = 0) or m = r + 1 (O > 1) is a failure, like any garbage."""
  solve_p3 = online.solve_p3

  def lying_p3(problem, solver):
    m, bandwidth, tau, objective = solve_p3(problem, solver)
    if isinstance(getattr(solver, "__self__", None), solvers.MinLatencyProblem):  # the cvx stage
      return bad_m, bandwidth, tau, objective
    return m, bandwidth, tau, objective

  monkeypatch.setattr(online, "solve_p3", lying_p3)
  ctrl = support.make_controller("osfa", solver="cvx")
  with caplog.at_level(logging.WARNING):
    plan, _ = ctrl.plan(support.controller_state(queue=1.0), 2,
                        schedule.sample_clients(0, 2, support.N, support.K), None)
  assert (plan.solver, plan.fallbacks) == ("numpy", 1)
  assert f"m = {bad_m} is not one of the candidates" in caplog.text
  assert_valid(plan)


def test_garbage_from_both_solvers_ends_on_the_equal_split(monkeypatch):
  monkeypatch.setattr(online, "min_latency_numpy",
                      lambda bits, a, c, total, b_min: (0.1, np.full(len(a), total)))
  _, plan = plan_with(monkeypatch, GARBAGE["negative_bandwidth"][0])
  assert (plan.solver, plan.fallbacks, plan.m, plan.keep_ratio) == ("equal", 2, 1, 1 / 8)
  np.testing.assert_array_equal(plan.bandwidth_hz, np.full(K, 2e5))  # 1 MHz over 5 clients
  assert np.isfinite(plan.predicted_latency_s)


# ------------------------------------------------------------- 8. deep fades and a dead link


@pytest.mark.slow
def test_deep_fades_and_a_dead_link_give_valid_plans_and_no_nan(cache_dir, tmp_path,
                                                                 monkeypatch, caplog):
  """Round 2: every gain 1e-30 (a ~300 dB fade). Round 3: every gain 0 and the first sampled
  client's upload lost. The controller must still hand the round a valid allocation."""
  gains, dropouts = link_lib.Link.gains, channel_lib.dropouts
  n, k = 6, 3  # configs/testing.py

  def faded(self, seed, t):
    g = gains(self, seed, t)
    return {1: np.full_like(g, 1e-30), 2: np.zeros_like(g)}.get(t, g)

  def lost(num_clients, probability, seed, t):
    mask = dropouts(num_clients, probability, seed, t)
    if t == 2:
      mask = mask.copy()
      mask[schedule.sample_clients(seed, t, n, k)[0]] = True
    return mask

  plans = []
  plan = controller_lib.LatencyController.plan
  monkeypatch.setattr(link_lib.Link, "gains", faded)
  monkeypatch.setattr(channel_lib, "dropouts", lost)
  def recorded(self, *args):
    decision = plan(self, *args)
    plans.append(decision[0])
    return decision

  monkeypatch.setattr(controller_lib.LatencyController, "plan", recorded)
  with caplog.at_level(logging.WARNING):
    summary = experiment.run(make_config(cache_dir, rounds=4, **OSFA), str(tmp_path / "fades"))
  rows = summary["rows"]
  for p in plans:
    assert_valid(p, total_bw_hz=20e6, k=k, rank=4)
  for r in rows:
    assert np.isfinite(r["train_loss"])
    assert not any(isinstance(v, float) and math.isnan(v) for v in r.values()), r
  # 1e-30: a valid split, a huge but finite latency, exactly as predicted.
  assert rows[1]["solver"] in ("cvx", "numpy") and 1e20 < rows[1]["latency_s"] < math.inf
  assert rows[1]["latency_s"] == pytest.approx(rows[1]["predicted_latency_s"], rel=1e-4)
  # No gain at all: no solver can serve it; the equal split with m = 1, latency reported inf.
  assert (rows[2]["solver"], rows[2]["fallbacks"], rows[2]["kept_components"]) == ("equal", 2, 1)
  assert rows[2]["latency_s"] == rows[2]["predicted_latency_s"] == rows[2]["queue"] == math.inf
  assert "a client with bits to send has zero channel gain" in caplog.text
  assert "TSFA used the equal-bandwidth fallback with m = 1 (tau inf s)" in caplog.text
  np.testing.assert_array_equal(plans[2].bandwidth_hz, np.full(k, 20e6 / k))
  # An infinite queue keeps every later round on the equal split, logged as fallbacks.
  assert (rows[3]["solver"], rows[3]["fallbacks"], rows[3]["kept_components"]) == ("equal", 2, 1)
  assert "cvx: SolverFailure: non-finite objective" in caplog.text
  assert np.isfinite(rows[3]["latency_s"]) and summary["final_accuracy"] is not None


# ------------------------------------------------------------------- 9. no bandwidth at all


def test_zero_bandwidth_is_refused_at_every_level():
  a, compute = np.full(K, 1e9), np.full(K, 0.1)
  bits_fn = lambda m: 1e5 * m  # noqa: E731
  p3 = online.P3Problem(range(1, 5), lambda m: 1 - m / 4, 1.0, 1.0, 0.3, bits_fn, a, compute)
  for total in (0.0, -1.0, math.nan):
    with pytest.raises(ValueError, match=r"total_bw_hz must be a finite number > 0 Hz \(config "
                                         r"wireless.bandwidth_mhz\), got"):
      online.solve_with_fallback(p3, total_bw_hz=total, primary="numpy")
  with pytest.raises(ValueError, match="5 clients x b_min 1000.0 Hz exceed the band 0.0 Hz"):
    solvers.MinLatencyProblem(K, 0.0)
  with pytest.raises(solvers.SolverFailure, match="exceed the band 0.0 Hz"):
    solvers.min_latency_numpy(np.full(K, 1e5), a, compute, 0.0)
  # Less band than K x b_min is not an error: the twin fails and the equal split still runs.
  decision = online.solve_with_fallback(p3, total_bw_hz=2e3, primary="numpy")
  assert (decision.solver, decision.m) == ("equal", 1)
  np.testing.assert_array_equal(decision.bandwidth_hz, np.full(K, 400.0))


# ------------------------------------------------------------------------ 10. kill campaign

KILL_ROUNDS = 10
KILL_IN_SAVE = r'''
"""experiments.run, with RunCheckpointer.save patched to SIGKILL this process during one save.

  python kill_in_save.py STEP HOOK --config=... --workdir=...
HOOK "start": die when orbax begins writing the items into its tmp dir; "finalize": die when
every item is written into the tmp dir, before it is renamed to the step's directory.
"""
import os
import signal
import sys

import orbax.checkpoint as ocp
from absl import app

from experiments import run
from softjax.run import checkpointing

KILL_STEP, HOOK = int(sys.argv.pop(1)), sys.argv.pop(1)
save = checkpointing.RunCheckpointer.save


def die(*args, **kwargs):
  os.kill(os.getpid(), signal.SIGKILL)


def save_then_die(self, step, state, host):
  if step == KILL_STEP:
    if HOOK == "start":
      ocp.JsonCheckpointHandler.async_save = die
    else:
      ocp.StandardCheckpointHandler.finalize = die
  return save(self, step, state, host)


checkpointing.RunCheckpointer.save = save_then_die
app.run(run.main)
'''


def complete_lines(path):
  try:
    with open(path) as f:
      return f.read().count("\n")
  except FileNotFoundError:
    return 0


def final_accuracy(stdout):
  return re.search(r"final test accuracy (\S+) \|", stdout).group(1)


@pytest.mark.slow
def test_kill_campaign_resumes_to_identical_metrics(cache_dir, tmp_path):
  """SIGKILL the launcher 4 times (twice at a seeded point after a new row, twice inside a
  checkpoint save), resume each time with the same command: the rows and the final accuracy
  equal an uninterrupted run's."""
  env = {**os.environ, "PYTHONPATH": REPO,
         # The uninterrupted run fills a compilation cache that the killed runs only read.
         "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
         "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
  flags = [f"--config=configs/testing.py:rounds={KILL_ROUNDS}", "--config.checkpoint.every=1",
           f"--config.model.cache_dir={cache_dir}"]
  launcher = [sys.executable, "-m", "experiments.run", *flags]
  full = subprocess.run(launcher + [f"--workdir={tmp_path / 'full'}"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert full.returncode == 0, full.stderr[-3000:]

  workdir = str(tmp_path / "killed")
  checkpoints = os.path.join(workdir, "checkpoints")
  metrics = os.path.join(workdir, "metrics.jsonl")
  driver = tmp_path / "kill_in_save.py"
  driver.write_text(KILL_IN_SAVE)
  rng = np.random.default_rng(20240601)
  done = 0
  for i, kind in enumerate(["row", "start", "row", "finalize"]):
    out_path = tmp_path / f"launch{i}.out"
    with open(out_path, "w") as out:
      if kind == "row":  # a seeded delay after the next new row: mid-round, -eval or -save
        target, delay = complete_lines(metrics) + 1, rng.uniform(0.0, 0.2)
        proc = subprocess.Popen(launcher + [f"--workdir={workdir}"], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while complete_lines(metrics) < target and proc.poll() is None:
          assert time.time() < deadline, "the launcher made no progress"
          time.sleep(0.01)
        time.sleep(delay)
        proc.kill()
        returncode = proc.wait()
      else:  # deterministic: inside the save of the next step or the one after
        step = done + 1 + int(rng.integers(0, 2))
        returncode = subprocess.run([sys.executable, str(driver), str(step), kind, *flags,
                                     f"--workdir={workdir}"], cwd=REPO, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, timeout=300).returncode
        # Killed mid-save: orbax's tmp dir is there, the step itself is not.
        assert os.path.isdir(os.path.join(checkpoints, f"{step}.orbax-checkpoint-tmp"))
        assert newest_step(workdir) == step - 1
    output = out_path.read_text()
    assert returncode == -signal.SIGKILL, output[-3000:]
    if done:  # each launch resumed from the newest complete checkpoint
      assert f"after {done} completed rounds" in output
    assert newest_step(workdir) >= done  # and a kill never lost it
    done = newest_step(workdir)
    assert done < KILL_ROUNDS

  resumed = subprocess.run(launcher + [f"--workdir={workdir}"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"after {done} completed rounds" in resumed.stdout
  assert comparable(rows_of(workdir)) == comparable(rows_of(str(tmp_path / "full")))
  assert final_accuracy(resumed.stdout) == final_accuracy(full.stdout)
  # Every tmp dir a kill left was replaced when its step was saved again.
  assert sorted(os.listdir(checkpoints)) == sorted([str(KILL_ROUNDS - 1), str(KILL_ROUNDS)])


# ------------------------------------------------------------------------- 11. determinism


@pytest.mark.slow
def test_same_seed_same_rows_other_seed_other_losses(reference, cache_dir, tmp_path):
  again = experiment.run(make_config(cache_dir), str(tmp_path / "again"))
  assert comparable(again["rows"]) == comparable(reference[1]["rows"])
  assert again["final_accuracy"] == reference[1]["final_accuracy"]
  other = make_config(cache_dir)
  other.seed = 1
  other = experiment.run(other, str(tmp_path / "seed1"))
  losses = lambda rows: [r["train_loss"] for r in rows]  # noqa: E731
  assert all(a != b for a, b in zip(losses(other["rows"]), losses(reference[1]["rows"])))


# ---------------------------------------------------------- 12. a workdir held by a live run


def test_second_run_on_a_held_workdir_is_refused_at_once(cache_dir, tmp_path):
  workdir = str(tmp_path / "held")
  os.makedirs(workdir)
  held = workdir_lib.WorkdirLock(workdir)
  try:
    with pytest.raises(WorkdirError, match=rf"in use by another live run \(pid {os.getpid()}\)"):
      experiment.run(make_config(cache_dir), workdir)
  finally:
    held.release()
  assert sorted(os.listdir(workdir)) == [".lock"]  # refused before anything was set up


def test_the_lock_of_a_killed_run_does_not_block_the_next(tmp_path):
  code = ("import sys, time\nfrom softjax.run import workdir as w\n"
          "w.WorkdirLock(sys.argv[1])\nprint('held', flush=True)\ntime.sleep(120)")
  proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=REPO,
                          stdout=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(WorkdirError, match=f"pid {proc.pid}"):
      workdir_lib.WorkdirLock(str(tmp_path))
  finally:
    proc.kill()
    proc.wait()
  workdir_lib.WorkdirLock(str(tmp_path)).release()  # the kernel dropped the dead run's lock


# ------------------------------------------------------------------------------- 13. Ctrl-C


@pytest.mark.slow
def test_ctrl_c_in_the_loop_is_one_line_and_the_run_resumes(reference, cache_dir, tmp_path):
  def interrupt(t):
    if t == 3:
      raise KeyboardInterrupt

  workdir = str(tmp_path / "interrupted")
  with pytest.raises(errors.Interrupted, match=re.escape(
      "interrupted after round 3 (newest checkpoint: round 2); run the same command to resume")):
    experiment.run(make_config(cache_dir), workdir, on_round_end=interrupt)
  experiment.run(make_config(cache_dir), workdir)
  assert comparable(rows_of(workdir)) == comparable(rows_of(reference[0]))


def test_ctrl_c_during_a_save_waits_for_the_save():
  ran_on = []
  with pytest.raises(KeyboardInterrupt):
    with checkpointing._interrupts_held():
      os.kill(os.getpid(), signal.SIGINT)
      ran_on.append("after the signal")  # the block is not cut short
  assert ran_on == ["after the signal"]


WAIT_FOR_SIGINT = r'''
"""experiments.run, waiting (interruptibly) after round ROUND until a signal comes, so that a
test's SIGINT lands inside the round loop however fast the rounds are.

  python wait_for_sigint.py ROUND --config=... --workdir=...
"""
import functools
import sys
import time

from absl import app

from experiments import run
from softjax.run import experiment

ROUND = int(sys.argv.pop(1))


def wait_after(t):
  if t == ROUND:
    print("waiting for SIGINT", flush=True)
    time.sleep(120)


experiment.run = functools.partial(experiment.run, on_round_end=wait_after)
app.run(run.main)
'''


@pytest.mark.slow
def test_sigint_to_the_launcher_prints_one_line_and_resumes(reference, cache_dir, tmp_path):
  # The launcher waits after round 3 for the signal: sent on the progress line alone, it raced
  # the last test-scale rounds (a few ms each) and lost under a loaded CPU.
  driver = tmp_path / "wait_for_sigint.py"
  driver.write_text(WAIT_FOR_SIGINT)
  workdir = str(tmp_path / "sigint")
  flags = ["--config=configs/testing.py:rounds=6", f"--workdir={workdir}",
           f"--config.model.cache_dir={cache_dir}"]
  env = support.env_without_compilation_cache(PYTHONPATH=REPO)
  proc = subprocess.Popen([sys.executable, str(driver), "3", *flags], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  for line in proc.stdout:
    if line.startswith("waiting for SIGINT"):
      proc.send_signal(signal.SIGINT)
      break
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err
  assert "Traceback" not in err
  last = err.strip().splitlines()[-1]
  assert re.fullmatch(r"interrupted after round \d \(newest checkpoint: round \d\); run the same "
                      r"command to resume", last), err
  rerun = subprocess.run([sys.executable, "-m", "experiments.run", *flags], cwd=REPO,
                         capture_output=True, text=True, timeout=300, env=env)
  assert rerun.returncode == 0, rerun.stderr
  assert comparable(rows_of(workdir)) == comparable(rows_of(reference[0]))


# --------------------------------------------------- 14. damaged, cut off or deleted metrics


def _rewrite_metrics(workdir, keep):
  path = os.path.join(workdir, "metrics.jsonl")
  lines = open(path).read().splitlines()
  with open(path, "w") as f:
    f.write("".join(keep(i + 1, line) for i, line in enumerate(lines)))


METRICS_DAMAGE = {  # round -> what is left of its line
    "rows_5_6_deleted": lambda t, line: "" if t >= 5 else line + "\n",
    "row_5_garbled": lambda t, line: "{not json\n" if t == 5 else line + "\n",
    "file_cut_inside_row_5": lambda t, line: (line + "\n" if t < 5 else
                                              line[:10] if t == 5 else ""),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", METRICS_DAMAGE)
def test_missing_metrics_rows_are_recomputed_from_an_earlier_checkpoint(
    damage, reference, cache_dir, tmp_path, caplog):
  workdir = copy_of(reference[0], tmp_path)
  _rewrite_metrics(workdir, METRICS_DAMAGE[damage])
  with caplog.at_level(logging.WARNING):
    summary = experiment.run(make_config(cache_dir), workdir)
  assert "no rows for rounds 5" in caplog.text and "after round 4" in caplog.text
  assert summary["missing_rounds"] == []
  assert comparable(rows_of(workdir)) == comparable(rows_of(reference[0]))
  assert steps_in(workdir) == [4, 6]  # step 6 was saved again
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "6.replaced"))  # the old one kept


@pytest.mark.slow
def test_metrics_rows_no_checkpoint_can_recompute_are_named(reference, cache_dir, tmp_path,
                                                             caplog, capsys):
  workdir = copy_of(reference[0], tmp_path)
  _rewrite_metrics(workdir, lambda t, line: "" if t <= 2 else line + "\n")
  with caplog.at_level(logging.WARNING):
    summary = experiment.run(make_config(cache_dir), workdir)
  assert "no rows for rounds 1-2 and no kept checkpoint precedes them" in caplog.text
  assert summary["missing_rounds"] == [1, 2]
  assert "metrics.jsonl has no rows for rounds 1-2" in capsys.readouterr().out
  assert comparable(rows_of(workdir)) == comparable(rows_of(reference[0])[2:])


@pytest.mark.slow
def test_a_deleted_metrics_file_is_reported_and_the_summary_does_not_crash(
    reference, cache_dir, tmp_path, capsys):
  workdir = copy_of(reference[0], tmp_path)
  os.remove(os.path.join(workdir, "metrics.jsonl"))
  summary = experiment.run(make_config(cache_dir), workdir)
  assert summary["missing_rounds"] == list(range(1, ROUNDS + 1))
  assert summary["final_accuracy"] is None
  assert "final test accuracy n/a" in capsys.readouterr().out


# ---------------------------------------------------------- 15. a damaged cached backbone


@pytest.mark.slow
def test_a_damaged_cached_backbone_is_rebuilt(cache_dir, tmp_path, caplog):
  own_cache = str(tmp_path / "cache")
  experiment.run(make_config(own_cache, rounds=1), str(tmp_path / "first"))
  (cached,) = glob.glob(os.path.join(own_cache, "*.npz"))
  with open(cached, "r+b") as f:
    f.truncate(os.path.getsize(cached) // 2)
  with caplog.at_level(logging.WARNING):
    summary = experiment.run(make_config(own_cache, rounds=1), str(tmp_path / "second"))
  assert "cannot be read" in caplog.text and "pretrained again" in caplog.text
  assert os.path.exists(cached + ".damaged") and summary["final_accuracy"] is not None
  first = rows_of(str(tmp_path / "first"))
  assert comparable(rows_of(str(tmp_path / "second"))) == comparable(first)  # same backbone


def test_a_damaged_backbone_given_by_path_is_one_error(cache_dir, tmp_path):
  path = str(tmp_path / "vit.npz")
  with open(path, "wb") as f:
    f.write(b"PK\x03\x04 not really a zip")
  with pytest.raises(errors.BackboneError, match=f"{re.escape(path)} cannot be read"):
    experiment.run(make_config(cache_dir, **{"model.backbone": path}), str(tmp_path / "w"))


# -------------------------------------------------- 16. a data_dir that does not exist, budgets


def test_a_data_dir_that_does_not_exist_is_an_error(cache_dir, tmp_path):
  missing = str(tmp_path / "no_such_dir")
  with pytest.raises(errors.DatasetNotFoundError,
                     match=rf"data.data_dir = '{re.escape(missing)}' is not a directory"):
    experiment.run(make_config(cache_dir, **{"data.data_dir": missing}), str(tmp_path / "w"))


@pytest.mark.slow
def test_a_budget_local_training_alone_exceeds(cache_dir, tmp_path, caplog):
  tiny = {"wireless.budget_s": 1e-9}
  with pytest.raises(config_lib.ConfigError,
                     match=r"wireless.budget_s = 1e-09 .* fastest client's local training"):
    experiment.run(make_config(cache_dir, rounds=1, **OSFA, **tiny), str(tmp_path / "osfa"))
  with caplog.at_level(logging.WARNING):  # the fixed controller only reports latency: a warning
    experiment.run(make_config(cache_dir, rounds=1, **tiny), str(tmp_path / "fixed"))
  assert "local training time of the slowest clients" in caplog.text


# --------------------------------------- 17. a checkpoint made before the controller state moved


@pytest.mark.slow
def test_a_checkpoint_with_the_queue_in_its_host_record_resumes(cache_dir, tmp_path):
  """Checkpoints made before this change kept the queue in the JSON host record
  (`controllers`), not in the state tree; they resume to the rows of an uninterrupted run."""
  config = make_config(cache_dir, **OSFA)
  full = str(tmp_path / "full")
  experiment.run(config, full)
  old = checkpointing.RunCheckpointer(os.path.join(full, "checkpoints"), every=2, keep=2)
  meta = old._saved_metadata(4)
  template = {k: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), v)
              for k, v in meta.items() if k != "controller"}
  template["controller"] = {"queue": np.zeros((), np.float64),
                            "fallbacks": np.zeros((), np.int64)}
  tree, host = old.restore(4, template)
  old.close()
  controller = tree.pop("controller")
  host["controllers"] = [{"queue": float(controller["queue"]),
                          "fallbacks": int(controller["fallbacks"])}]
  assert float(controller["queue"]) > 0  # the queue matters for the rounds that follow
  legacy = str(tmp_path / "legacy")
  writer = checkpointing.RunCheckpointer(os.path.join(legacy, "checkpoints"), every=2, keep=2)
  writer.save(4, tree, host)
  writer.close()
  rows = rows_of(full)
  with open(os.path.join(legacy, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows[:4])
  experiment.run(config, legacy)
  assert comparable(rows_of(legacy)) == comparable(rows)
