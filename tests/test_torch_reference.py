"""Tests of experiments/torch_reference.py (the PyTorch + peft benchmark baseline)."""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from experiments import torch_reference as tr  # noqa: E402  (after the importorskips)

TINY = dict(variant="tiny", image_size=8, channels=1, num_classes=10, rank=4, alpha=8.0,
            targets=("query", "value"))


def tiny_model():
  torch.manual_seed(0)
  return tr.build_model(**TINY)


def frozen_state(model):
  return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def is_trainable_name(name):
  return "lora_A" in name or "lora_B" in name or "head.modules_to_save" in name


def test_trainable_count_matches_softjax():
  # tiny: width 16, depth 2. LoRA on query and value of each block: an A [r, d_in] and a
  # B [d_out, r] with d_in = d_out = 16, so 2 blocks * 2 targets * 4 * (16 + 16) = 512.
  # Head Dense 16 -> 10: 16 * 10 + 10 = 170. Total 512 + 170 = 682.
  assert tr.trainable_count(tiny_model()) == 2 * 2 * 4 * (16 + 16) + (16 * 10 + 10) == 682


def test_only_lora_and_head_train():
  model = tiny_model()
  names = {n: p.requires_grad for n, p in model.named_parameters()}
  trainable = {n for n, g in names.items() if g}
  assert trainable == {n for n in names if is_trainable_name(n)}
  # 2 blocks * 2 targets * (A, B) + head weight and bias.
  assert len(trainable) == 2 * 2 * 2 + 2
  # Backbone (attention, MLP, norms, embeddings, the original head) is frozen.
  assert any("query.base_layer.weight" in n for n in names)
  assert not any(g for n, g in names.items() if "base_layer" in n or "fc1" in n)


def client_data(counts, seed=0):
  rng = np.random.default_rng(seed)
  return [(rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8),
           rng.integers(0, 10, n, dtype=np.int32)) for n in counts]


def test_round_trains_adapters_and_head_only():
  model = tiny_model()
  round_fn = tr.make_round(model, local_steps=3, batch_size=4, lr=0.1)
  before = tr.trainable_state(model)
  frozen = frozen_state(model)
  b_keys = [k for k in before if "lora_B" in k]
  assert b_keys and all(torch.count_nonzero(before[k]) == 0 for k in b_keys)  # peft B = 0

  after, loss = round_fn(before, client_data([6, 6]))
  assert math.isfinite(loss)
  assert set(after) == set(before)
  # The zero head passes no gradient to B on the first step; later steps move it.
  assert all(torch.count_nonzero(after[k]) > 0 for k in b_keys)
  head_keys = [k for k in before if "head" in k]
  assert len(head_keys) == 2
  assert all(not torch.equal(after[k], before[k]) for k in head_keys)
  for name, value in frozen_state(model).items():
    assert torch.equal(value, frozen[name]), name


def test_aggregate_is_data_size_weighted_mean():
  glob = {"w": torch.tensor([1.0, 2.0, -4.0])}
  c1 = {"w": torch.tensor([5.0, 2.0, 0.0])}  # delta_1 = [4, 0, 4]
  c2 = {"w": torch.tensor([1.0, 6.0, -8.0])}  # delta_2 = [0, 4, -4]
  new = tr.aggregate(glob, [c1, c2], [10, 30])
  # p = 10/40, 30/40: update = 0.25 * [4, 0, 4] + 0.75 * [0, 4, -4] = [1, 3, -2].
  torch.testing.assert_close(new["w"], torch.tensor([2.0, 5.0, -6.0]), rtol=0, atol=0)
  torch.testing.assert_close(glob["w"], torch.tensor([1.0, 2.0, -4.0]))  # input untouched


def test_round_server_step_weights_by_counts(monkeypatch):
  captured = {}
  real_aggregate = tr.aggregate

  def spy(global_state, client_states, counts):
    captured.update(states=client_states, counts=list(counts))
    return real_aggregate(global_state, client_states, counts)

  monkeypatch.setattr(tr, "aggregate", spy)
  model = tiny_model()
  round_fn = tr.make_round(model, local_steps=3, batch_size=4, lr=0.1)
  old = tr.trainable_state(model)
  new, _ = round_fn(old, client_data([10, 30]))
  assert captured["counts"] == [10, 30]
  name = next(k for k in old if "head.modules_to_save" in k and k.endswith("weight"))
  d1, d2 = (s[name] - old[name] for s in captured["states"])
  assert torch.count_nonzero(d1) > 0 and not torch.equal(d1, d2)
  torch.testing.assert_close(new[name] - old[name], 0.25 * d1 + 0.75 * d2)


def test_time_rounds_tiny():
  setting = tr.Setting(variant="tiny", image_size=8, channels=1, num_classes=10, rank=4,
                       alpha=8.0, clients=2, local_steps=2, batch_size=4, examples_per_client=8)
  record = tr.time_rounds(setting, rounds=2, warmup=1)
  assert record["round_s"] > 0
  assert len(record["round_s_all"]) == 2
  assert record["trainable"] == 682
  assert record["threads"] >= 1
  assert record["torch_version"] == torch.__version__
  assert math.isfinite(record["loss"])
