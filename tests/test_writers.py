"""Metrics writers besides metrics.jsonl: TensorBoard event files (tensorboardX, which CI
installs) and W&B (a stand-in module records the calls; wandb itself is optional)."""

import glob
import os
import struct
import sys
import types

import pytest

from softjax import config as config_lib
from softjax.run import experiment
from softjax.run import metrics as metrics_lib
from softjax.run import writers as writers_lib
from tests.support import make_config

tensorboardx = pytest.importorskip("tensorboardX")


def read_events(logdir):
  """(tag, step, value) of every scalar in the event files, parsed from the TFRecord framing
  (length, crc, payload, crc) with the Event protobuf tensorboardX ships."""
  from tensorboardX.proto import event_pb2
  out = []
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    data = open(path, "rb").read()
    at = 0
    while at < len(data):
      (length,) = struct.unpack("<Q", data[at:at + 8])
      event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
      at += 12 + length + 4
      out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
  return out


def test_scalars_take_the_numeric_fields_and_tag_sweep_members():
  row = {"round": 3, "train_loss": 0.5, "solver": "cvx", "uplink_bits": 7, "member": 1,
         "sweep.zeta": 0.1}
  assert writers_lib.scalars(row) == {"member1/train_loss": 0.5, "member1/uplink_bits": 7.0,
                                      "member1/sweep.zeta": 0.1}


@pytest.mark.slow
def test_tensorboard_events_hold_the_jsonl_rows(cache_dir, tmp_path):
  workdir = str(tmp_path / "tb")
  config = make_config(cache_dir, rounds=2, **{"metrics.writers": "tensorboard"})
  experiment.run(config, workdir)
  rows = metrics_lib.read_rows(os.path.join(workdir, "metrics.jsonl"))
  events = {(tag, step): value for tag, step, value in
            read_events(os.path.join(workdir, "tensorboard"))}
  for row in rows:
    assert events[("train_loss", row["round"])] == pytest.approx(row["train_loss"], rel=1e-6)
    assert events[("uplink_bits", row["round"])] == pytest.approx(row["uplink_bits"])
  assert ("test_accuracy", 2) in events and ("solver", 1) not in events


@pytest.mark.slow
def test_wandb_gets_every_row_once_per_round(cache_dir, tmp_path, monkeypatch):
  calls = []

  class FakeRun:
    def log(self, values, step):
      calls.append((step, values))

    def finish(self):
      calls.append("finish")

  def init(**kwargs):
    calls.append(("init", kwargs["project"], kwargs["resume"]))
    return FakeRun()

  monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
  config = make_config(cache_dir, rounds=2, **{"metrics.writers": "wandb",
                                               "metrics.wandb_project": "p"})
  experiment.run(config, str(tmp_path / "wb"))
  assert calls[0] == ("init", "p", "allow") and calls[-1] == "finish"
  assert [c[0] for c in calls[1:-1]] == [1, 2]
  assert "train_loss" in calls[1][1] and "test_accuracy" in calls[2][1]


def test_a_writer_that_is_not_installed_is_refused_before_setup(cache_dir, tmp_path,
                                                                 monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
  config = make_config(cache_dir, rounds=1, **{"metrics.writers": "wandb"})
  with pytest.raises(config_lib.ConfigError, match="metrics.writers = 'wandb' .* pip install"):
    experiment.run(config, str(tmp_path / "w"))
  assert sorted(os.listdir(tmp_path / "w")) == [".lock"]
  bad = make_config(cache_dir, **{"metrics.writers": "mlflow"})
  with pytest.raises(config_lib.ConfigError, match="tensorboard, wandb"):
    config_lib.validate(bad)
