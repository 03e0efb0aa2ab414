"""Reading and writing ViT weights in the public `.npz` layout.

The layout is the one of google-research/vision_transformer and big_vision: a flat `.npz`
whose keys are module paths joined by '/', e.g.
`Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel`. The project's own
pretrained backbone (`experiments/pretrain.py`) is written in the same layout, so one loader
serves both it and a downloaded ViT-B/16.
"""

from __future__ import annotations

from collections.abc import Mapping
import math
import os
import tempfile
from typing import Any
import zipfile

from absl import logging
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from softjax.errors import BackboneError, CheckpointMismatchError

PyTree = Any
FlatParams = dict[str, np.ndarray]

SEP = "/"
POSEMB_KEY = "Transformer/posembed_input/pos_embedding"
HEAD_PREFIX = "head/"
# ViT-B/16 ImageNet-21k checkpoints carry a representation layer before the head;
# `VisionTransformer` has none.
PRE_LOGITS_PREFIX = "pre_logits/"


def flatten_params(tree: Mapping[str, Any]) -> FlatParams:
  """Flattens a nested params dict into `{'a/b/c': array}`.

  Args:
    tree: nested dict of arrays.

  Returns:
    Flat dict of NumPy arrays keyed by '/'-joined paths.
  """
  flat = traverse_util.flatten_dict(tree, sep=SEP)
  return {key: np.asarray(value) for key, value in flat.items()}


def unflatten_params(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Inverse of `flatten_params`.

  Args:
    flat: dict keyed by '/'-joined paths.

  Returns:
    Nested dict.
  """
  return traverse_util.unflatten_dict(dict(flat), sep=SEP)


def save_npz(path: str | os.PathLike, params: Mapping[str, Any]) -> None:
  """Writes params in the flat `.npz` layout, atomically.

  The file is written to a temporary name in the target directory and then renamed, so a
  reader (or a preempted writer) never sees a half-written checkpoint.

  Args:
    path: destination file; parent directories are created.
    params: nested params dict.
  """
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  flat = flatten_params(params)
  fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".npz")
  try:
    # Writing through the file object stops NumPy from appending another ".npz".
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **flat)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp_path, path)
  except BaseException:
    if os.path.exists(tmp_path):
      os.remove(tmp_path)
    raise


def load_npz(path: str | os.PathLike) -> FlatParams:
  """Reads a flat `.npz` checkpoint.

  Args:
    path: the checkpoint file.

  Returns:
    Flat dict `{'a/b/c': np.ndarray}`.

  Raises:
    BackboneError: the file does not exist (the message says how to make one), or it is
      truncated or damaged.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise BackboneError(
        f"No ViT checkpoint at {path!r}. Produce one with `python -m experiments.pretrain` "
        "(the project's CPU-scale backbone), or download a ViT .npz in the "
        "google-research/vision_transformer layout (e.g. ViT-B_16.npz) and pass its path.")
  try:
    with np.load(path, allow_pickle=False) as data:
      return {key: data[key] for key in data.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise BackboneError(f"ViT checkpoint {path} cannot be read ({type(e).__name__}: {e}); the "
                        "file is truncated or damaged: download or produce it again") from e


def resize_posemb(posemb: np.ndarray, new_len: int) -> np.ndarray:
  """Resizes a position embedding to a new number of patches, as ViT fine-tuning does.

  The public convention (google-research/vision_transformer, fine-tuning at another
  resolution): the class-token row is kept aside unchanged; the patch rows, viewed as a square
  g x g grid, are interpolated linearly along both grid axes to G x G with the corner cells
  aligned (`scipy.ndimage.zoom` with order=1: output cell j samples input position
  j (g - 1) / (G - 1)), each embedding channel on its own.

  Args:
    posemb: `[1, 1 + g*g, D]`.
    new_len: target length `1 + G*G`.

  Returns:
    `[1, new_len, D]` float32.

  Raises:
    ValueError: either length does not have a square patch grid.
  """
  old_grid, new_grid = _square_grid(posemb.shape[1] - 1), _square_grid(new_len - 1)
  width = posemb.shape[-1]
  cls_row = np.asarray(posemb[:, :1], np.float32)
  grid = np.asarray(posemb[0, 1:], np.float32).reshape(old_grid, old_grid, width)
  if new_grid != old_grid:
    factor = new_grid / old_grid
    grid = ndimage.zoom(grid, (factor, factor, 1), order=1)
  grid = grid.reshape(1, new_grid * new_grid, width).astype(np.float32)
  return np.concatenate([cls_row, grid], axis=1)


def _square_grid(num_patches: int) -> int:
  """Side of a square grid of `num_patches` cells; ValueError if not square."""
  side = math.isqrt(max(num_patches, 0))
  if num_patches < 1 or side * side != num_patches:
    raise ValueError(f"{num_patches} patches do not form a square grid.")
  return side


def _drop_pre_logits(ckpt: FlatParams) -> FlatParams:
  """Removes the `pre_logits/` representation layer, with a warning."""
  dropped = sorted(k for k in ckpt if k.startswith(PRE_LOGITS_PREFIX))
  if dropped:
    logging.warning("Checkpoint has a pre_logits layer the model does not use; dropping %s.",
                    dropped)
  return {k: v for k, v in ckpt.items() if not k.startswith(PRE_LOGITS_PREFIX)}


def _maybe_resize_posemb(ckpt: FlatParams, model_flat: Mapping[str, Any]) -> FlatParams:
  """Resizes the checkpoint's position embedding to the model's length when both are grids.

  Anything that cannot be resized is left unchanged, so the shape check reports it.
  """
  if POSEMB_KEY not in ckpt or POSEMB_KEY not in model_flat:
    return ckpt
  old, new_shape = ckpt[POSEMB_KEY], tuple(model_flat[POSEMB_KEY].shape)
  if old.shape == new_shape or old.ndim != 3 or old.shape[::2] != new_shape[::2]:
    return ckpt
  try:
    resized = resize_posemb(old, new_shape[1])
  except ValueError:
    return ckpt
  logging.info("Resized %s from %s to %s (cls row kept, patch grid bilinear).", POSEMB_KEY,
               old.shape, new_shape)
  return {**ckpt, POSEMB_KEY: resized}


def _check_compatible(ckpt: FlatParams, model_flat: Mapping[str, Any], path: str) -> None:
  """Raises one CheckpointMismatchError listing every missing key, extra key and bad shape."""
  missing = sorted(set(model_flat) - set(ckpt))
  extra = sorted(set(ckpt) - set(model_flat))
  mismatched = sorted(
      f"{key}: checkpoint {tuple(ckpt[key].shape)} vs model {tuple(model_flat[key].shape)}"
      for key in set(ckpt) & set(model_flat)
      if tuple(ckpt[key].shape) != tuple(model_flat[key].shape))
  if not (missing or extra or mismatched):
    return
  lines = [f"Checkpoint {path!r} does not match the model."]
  for title, items in (("missing keys (in the model, not in the checkpoint)", missing),
                       ("extra keys (in the checkpoint, not in the model)", extra),
                       ("shape mismatches", mismatched)):
    if items:
      lines.append(f"{len(items)} {title}:")
      lines.extend(f"  {item}" for item in items)
  raise CheckpointMismatchError("\n".join(lines))


def load_pretrained(path: str | os.PathLike, init_params: PyTree, *,
                    reset_head: bool = True) -> PyTree:
  """Loads a `.npz` checkpoint into the structure of freshly initialised params.

  Rules: with `reset_head`, checkpoint keys under `head/` are ignored and the head of
  `init_params` is kept (a new task has its own classes); `pre_logits/` keys are dropped with
  a warning; a position embedding of another length is resized; any other difference is an
  error that lists all differences at once.

  Args:
    path: the checkpoint file.
    init_params: params tree from `softjax.models.lora.init_params` (gives structure, shapes
      and, with `reset_head`, the head).
    reset_head: keep the head of `init_params` instead of the checkpoint's.

  Returns:
    A float32 params tree with the structure of `init_params`.

  Raises:
    FileNotFoundError: no file at `path`.
    CheckpointMismatchError: missing keys, extra keys or shape mismatches.
  """
  ckpt = _drop_pre_logits(load_npz(path))
  model_flat = traverse_util.flatten_dict(init_params, sep=SEP)
  if reset_head:
    ckpt = {k: v for k, v in ckpt.items() if not k.startswith(HEAD_PREFIX)}
    model_flat = {k: v for k, v in model_flat.items() if not k.startswith(HEAD_PREFIX)}
  ckpt = _maybe_resize_posemb(ckpt, model_flat)
  _check_compatible(ckpt, model_flat, os.fspath(path))

  def pick(key_path, init_value):
    key = jax.tree_util.keystr(key_path, simple=True, separator=SEP)
    value = ckpt.get(key, init_value)  # Only the reset head falls back to init_params.
    return jnp.asarray(value, jnp.float32)

  return jax.tree.map_with_path(pick, init_params)
