"""Tests of softjax.models.checkpoint (the public ViT .npz layout)."""

import os
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softjax.models import checkpoint as ckpt_lib
from softjax.models import lora as lora_lib
from softjax.models import vit

POSEMB = "Transformer/posembed_input/pos_embedding"
QUERY_KERNEL = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"


def template(image_size, num_classes=10, seed=0):
  """A params tree of the tiny ViT with random values (no init compile needed)."""
  cfg = vit.make_vit_config("tiny", image_size=image_size, channels=1, num_classes=num_classes)
  model = vit.VisionTransformer(cfg)
  shapes = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, image_size, image_size, 1))),
                          jax.random.key(0))["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)


def write(tmp_path, flat, name="ckpt.npz"):
  path = tmp_path / name
  np.savez(path, **flat)
  return path


@pytest.fixture
def pretrained(tmp_path):
  """(path, params) of a saved tiny checkpoint for 8x8 images."""
  params = template(8, seed=1)
  path = tmp_path / "sub" / "dir" / "vit.npz"
  ckpt_lib.save_npz(path, params)
  return path, params


def test_flatten_layout(pretrained):
  _, params = pretrained
  flat = ckpt_lib.flatten_params(params)
  assert QUERY_KERNEL in flat and "cls" in flat and "head/kernel" in flat
  assert flat[QUERY_KERNEL].shape == (16, 2, 8)
  chex.assert_trees_all_equal(ckpt_lib.unflatten_params(flat), params)


def test_save_load_round_trip(pretrained):
  path, params = pretrained
  assert os.listdir(path.parent) == ["vit.npz"]  # Parents created, no temp file left.
  flat = ckpt_lib.load_npz(path)
  assert set(flat) == set(ckpt_lib.flatten_params(params))
  chex.assert_trees_all_equal(ckpt_lib.unflatten_params(flat), params)


def test_save_overwrites_atomically(pretrained):
  path, params = pretrained
  other = jax.tree.map(lambda x: x + 1, params)
  ckpt_lib.save_npz(path, other)
  chex.assert_trees_all_equal(ckpt_lib.unflatten_params(ckpt_lib.load_npz(path)), other)
  assert os.listdir(path.parent) == ["vit.npz"]


def test_missing_file_says_how_to_make_one(tmp_path):
  with pytest.raises(FileNotFoundError, match="experiments.pretrain"):
    ckpt_lib.load_npz(tmp_path / "nope.npz")


def test_load_pretrained_keeps_init_head(pretrained):
  path, params = pretrained
  init = template(8, seed=2)
  loaded = ckpt_lib.load_pretrained(path, init)
  chex.assert_trees_all_equal_structs(loaded, init)
  chex.assert_type(jax.tree.leaves(loaded), jnp.float32)
  frozen, head = lora_lib.split_head(loaded)
  chex.assert_trees_all_equal(head, init["head"])
  chex.assert_trees_all_equal(frozen, lora_lib.split_head(params)[0])


def test_load_pretrained_head_of_other_task_is_ignored(tmp_path):
  path = write(tmp_path, ckpt_lib.flatten_params(template(8, num_classes=1000)))
  init = template(8, num_classes=10)
  loaded = ckpt_lib.load_pretrained(path, init)
  chex.assert_trees_all_equal(loaded["head"], init["head"])
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match="head/kernel"):
    ckpt_lib.load_pretrained(path, init, reset_head=False)


def test_load_pretrained_without_reset_takes_head(pretrained):
  path, params = pretrained
  loaded = ckpt_lib.load_pretrained(path, template(8, seed=2), reset_head=False)
  chex.assert_trees_all_equal(loaded, params)


def test_casts_to_float32(tmp_path):
  flat = {k: v.astype(np.float64) for k, v in ckpt_lib.flatten_params(template(8)).items()}
  loaded = ckpt_lib.load_pretrained(write(tmp_path, flat), template(8))
  chex.assert_type(jax.tree.leaves(loaded), jnp.float32)


def test_missing_and_extra_keys_in_one_error(tmp_path):
  flat = ckpt_lib.flatten_params(template(8))
  del flat[QUERY_KERNEL]
  flat["Transformer/encoderblock_9/LayerNorm_0/scale"] = np.ones(16, np.float32)
  with pytest.raises(ckpt_lib.CheckpointMismatchError) as err:
    ckpt_lib.load_pretrained(write(tmp_path, flat), template(8))
  message = str(err.value)
  assert QUERY_KERNEL in message
  assert "Transformer/encoderblock_9/LayerNorm_0/scale" in message
  assert "missing" in message and "extra" in message
  assert isinstance(err.value, ValueError)


def test_shape_mismatch_is_named(tmp_path):
  flat = ckpt_lib.flatten_params(template(8))
  flat[QUERY_KERNEL] = np.zeros((16, 4, 4), np.float32)
  flat["Transformer/encoder_norm/scale"] = np.zeros((15,), np.float32)
  with pytest.raises(ckpt_lib.CheckpointMismatchError) as err:
    ckpt_lib.load_pretrained(write(tmp_path, flat), template(8))
  message = str(err.value)
  assert f"{QUERY_KERNEL}: checkpoint (16, 4, 4) vs model (16, 2, 8)" in message
  assert "Transformer/encoder_norm/scale: checkpoint (15,) vs model (16,)" in message


def test_pre_logits_dropped_with_warning(tmp_path, pretrained):
  _, params = pretrained
  flat = ckpt_lib.flatten_params(params)
  flat["pre_logits/kernel"] = np.zeros((16, 16), np.float32)
  flat["pre_logits/bias"] = np.zeros((16,), np.float32)
  with mock.patch.object(ckpt_lib.logging, "warning") as warning:
    loaded = ckpt_lib.load_pretrained(write(tmp_path, flat), template(8, seed=2))
  warning.assert_called_once()
  assert "pre_logits/kernel" in str(warning.call_args)
  chex.assert_trees_all_equal(lora_lib.split_head(loaded)[0], lora_lib.split_head(params)[0])


def test_pos_embedding_resized_from_4x4_to_8x8(tmp_path):
  source = template(8)  # 8x8 images, patch 2: a 4x4 grid.
  rows = np.arange(16, dtype=np.float32)
  # Row 0 is the cls token; the grid is constant so bilinear resizing must keep it constant.
  posemb = np.concatenate([rows[None, None, :], np.full((1, 16, 16), 3.0, np.float32)], 1)
  source["Transformer"]["posembed_input"]["pos_embedding"] = posemb
  path = write(tmp_path, ckpt_lib.flatten_params(source))

  init = template(16)  # 16x16 images, patch 2: an 8x8 grid.
  loaded = ckpt_lib.load_pretrained(path, init)
  resized = loaded["Transformer"]["posembed_input"]["pos_embedding"]
  chex.assert_shape(resized, (1, 1 + 8 * 8, 16))
  np.testing.assert_array_equal(resized[0, 0], rows)
  np.testing.assert_allclose(resized[0, 1:], 3.0, rtol=1e-6)
  # Everything else is loaded unchanged.
  np.testing.assert_array_equal(loaded["cls"], source["cls"])


def test_resize_posemb_interpolates_grid():
  grid = np.arange(4, dtype=np.float32).reshape(2, 2)  # [[0, 1], [2, 3]]
  posemb = np.concatenate([[[[-1.0]]], grid.reshape(1, 4, 1)], axis=1)
  resized = ckpt_lib.resize_posemb(posemb, 1 + 16)
  chex.assert_shape(resized, (1, 17, 1))
  assert resized[0, 0, 0] == -1.0
  out = resized[0, 1:, 0].reshape(4, 4)
  # Bilinear upsampling keeps the corners and is monotone along both axes.
  assert out[0, 0] == 0.0 and out[-1, -1] == 3.0
  assert np.all(np.diff(out, axis=0) >= 0) and np.all(np.diff(out, axis=1) >= 0)


def _corner_aligned_linear(grid, new):
  """Independent reference: separable linear interpolation of a [g, g, D] grid onto G x G
  sample points j (g - 1) / (G - 1), written with np.interp, channel by channel."""
  old = grid.shape[0]
  points = np.arange(new) * (old - 1) / (new - 1)
  rows = np.stack([[np.interp(points, np.arange(old), grid[:, c, d]) for c in range(old)]
                   for d in range(grid.shape[2])], -1)  # [G(rows), g(cols), D] after transpose
  rows = rows.transpose(1, 0, 2)
  return np.stack([[np.interp(points, np.arange(old), rows[r, :, d]) for r in range(new)]
                   for d in range(grid.shape[2])], -1).transpose(0, 1, 2)


@pytest.mark.parametrize("old, new", [(4, 7), (7, 3), (2, 5), (14, 24)])
def test_resize_posemb_matches_an_independent_linear_reference(old, new):
  rng = np.random.default_rng(old * 100 + new)
  width = 3
  grid = rng.normal(size=(old, old, width)).astype(np.float32)
  cls = rng.normal(size=(1, 1, width)).astype(np.float32)
  posemb = np.concatenate([cls, grid.reshape(1, old * old, width)], axis=1)
  resized = ckpt_lib.resize_posemb(posemb, 1 + new * new)
  chex.assert_shape(resized, (1, 1 + new * new, width))
  np.testing.assert_array_equal(resized[:, :1], cls)  # the class token is kept aside
  want = _corner_aligned_linear(grid.astype(np.float64), new)
  np.testing.assert_allclose(resized[0, 1:].reshape(new, new, width), want, atol=1e-5)
  # The same grid size is the identity.
  np.testing.assert_array_equal(ckpt_lib.resize_posemb(posemb, 1 + old * old), posemb)


def test_non_square_pos_embedding_is_a_mismatch(tmp_path):
  flat = ckpt_lib.flatten_params(template(8))
  flat[POSEMB] = np.zeros((1, 1 + 12, 16), np.float32)
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match="pos_embedding: checkpoint"):
    ckpt_lib.load_pretrained(write(tmp_path, flat), template(8))


def test_loaded_params_run_in_model(pretrained):
  path, _ = pretrained
  model = vit.VisionTransformer(vit.make_vit_config("tiny", image_size=8, channels=1,
                                                    num_classes=10))
  init = lora_lib.init_params(model, jax.random.key(0), (8, 8, 1))
  loaded = ckpt_lib.load_pretrained(path, init)
  logits = jax.jit(model.apply)({"params": loaded}, jnp.ones((2, 8, 8, 1)))
  chex.assert_shape(logits, (2, 10))
  np.testing.assert_array_equal(logits, 0.0)  # The reset head is zero.
