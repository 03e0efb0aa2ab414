"""Payload bit counts against ALGORITHM.md 2.5, and the metrics writer's resume behaviour."""

import json

import numpy as np

from softjax.run import metrics as metrics_lib
from softjax.sparsify import payload


def test_dense_upload_bits_by_hand():
  # Two 128x128 adapted matrices at rank 8, float32, a 128x10 head with bias: every
  # component is sent, so no index bits.
  dims = [(128, 128), (128, 128)]
  bits = payload.lora_upload_bits(dims, rank=8, kept=8, value_bits=32, head_params=1290)
  assert bits == 32 * 8 * (256 + 256) + 32 * 1290


def test_sparse_upload_adds_the_cheaper_index_code():
  # r = 8, m = 2: a list costs 2 * 3 = 6 bits < an 8-bit bitmap; m = 4: 12 bits > bitmap 8.
  assert payload.index_bits_per_layer(8, 2) == 6
  assert payload.index_bits_per_layer(8, 4) == 8
  assert payload.index_bits_per_layer(8, 8) == 0
  bits = payload.lora_upload_bits([(4, 6)] * 3, rank=8, kept=2, value_bits=16, head_params=0)
  assert bits == 16 * 2 * 10 * 3 + 3 * 6


def test_writer_drops_rows_after_the_resumed_checkpoint(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  writer = metrics_lib.MetricsWriter(path)
  for t in range(1, 5):
    writer.write({"round": t, "train_loss": np.float32(1.0 / t)})
  writer.close()
  kept, missing = metrics_lib.recover_rows(path, done=2, members=1)
  assert missing == []
  resumed = metrics_lib.MetricsWriter(path, kept)
  assert [r["round"] for r in resumed.rows] == [1, 2]
  resumed.write({"round": 3, "train_loss": 0.5})
  resumed.close()
  rows = [json.loads(line) for line in open(path)]
  assert [r["round"] for r in rows] == [1, 2, 3]
  assert isinstance(rows[0]["train_loss"], float)


def test_recover_rows_names_damaged_cut_and_deleted_rounds(tmp_path):
  """Kinds of damage: a garbled line, a line that is not a row, a row cut off mid-write, a
  missing line, a duplicate; and a sweep member missing one round."""
  path = str(tmp_path / "metrics.jsonl")
  lines = [json.dumps({"round": 1}), "{garbage", json.dumps([1, 2]), json.dumps({"round": 4}),
           json.dumps({"round": 4, "train_loss": 2.0}), json.dumps({"round": 6})]
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n" + '{"round": 7, "train_lo')
  kept, missing = metrics_lib.recover_rows(path, done=7, members=1)
  assert [r["round"] for r in kept] == [1, 4, 6] and kept[1]["train_loss"] == 2.0  # last copy
  assert missing == [2, 3, 5, 7]
  assert metrics_lib.describe_rounds(missing) == "2-3, 5, 7"
  assert metrics_lib.recover_rows(str(tmp_path / "gone.jsonl"), 2, 1) == ([], [1, 2])
  with open(path, "w") as f:
    f.writelines(json.dumps({"round": t, "member": i}) + "\n" for t in (1, 2) for i in (0, 1)
                 if (t, i) != (2, 1))
  assert metrics_lib.recover_rows(path, done=2, members=2)[1] == [2]


def test_progress_line_and_summary():
  row = {"round": 3, "train_loss": 0.25, "test_accuracy": 0.5, "cum_uplink_bits": 8e6,
         "round_time_s": 2.0}
  line = metrics_lib.progress_line(row, total_rounds=5, rounds_per_s=0.5)
  assert "round 3/5" in line and "acc 0.5000" in line and "1.0 MB up" in line
  assert "ETA 4s" in line
  table = metrics_lib.summary_table([row])
  assert "| 3 | 0.2500 | 0.5000 | 1.00 |" in table
