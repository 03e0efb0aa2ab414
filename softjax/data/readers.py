"""File readers behind the data sources: IDX (.gz) files and prepared TFDS array_record dirs.
"""

from __future__ import annotations

import gzip
import os
import zlib

import numpy as np

from softjax.errors import DatasetNotFoundError

# Element type codes of the idx format (third byte of the magic number).
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str) -> np.ndarray:
  """Reads an idx file (optionally gzip-compressed) into a numpy array.

  The idx header is two zero bytes, one element-type byte, one byte giving the
  number of dimensions, then each dimension as a big-endian uint32; the data
  follows in C order, big-endian.

  Args:
    path: path of a `.gz` or uncompressed idx file.

  Returns:
    The array, in native byte order.

  Raises:
    ValueError: naming the file, if it cannot be decompressed (truncated or
      garbled), its header is malformed or the payload has the wrong size.
  """
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      raw = f.read()
  except FileNotFoundError:
    raise
  except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
    raise ValueError(f"{path}: cannot be read, the file is truncated or damaged"
                     f" ({type(err).__name__}: {err})") from err
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
    raise ValueError(f"{path}: not an idx file (magic {raw[:4].hex()})")
  dtype = _IDX_DTYPES[raw[2]]
  ndim = raw[3]
  header_len = 4 + 4 * ndim
  shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, offset=4))
  expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if len(raw) - header_len != expected:
    raise ValueError(
        f"{path}: header says {shape} of {dtype} ({expected} bytes) but the"
        f" payload has {len(raw) - header_len} bytes"
    )
  data = np.frombuffer(raw, dtype, offset=header_len).reshape(shape)
  return data.astype(dtype.newbyteorder("="))


def _read_idx_pair(directory: str, prefix: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads `{prefix}-images-idx3-ubyte.gz` and its labels as NHWC uint8 / int32."""
  images = read_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz"))
  labels = read_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte.gz"))
  if images.dtype != np.uint8 or images.ndim != 3:
    raise ValueError(f"{directory}/{prefix}: expected uint8 [N, H, W] images,"
                     f" got {images.dtype} {images.shape}")
  if images.shape[0] != labels.shape[0]:
    raise ValueError(f"{directory}/{prefix}: {images.shape[0]} images but "
                     f"{labels.shape[0]} labels")
  return images[..., None], labels.astype(np.int32)


# What `tfds.data_source` raises when the requested data is not prepared in
# `data_dir`. It is not one exception type: no dataset_info.json makes TFDS
# assume the tfrecord format (NotImplementedError: no random access), an
# unprepared default directory has no splits (KeyError), and a missing shard
# file fails when array_record opens it (RuntimeError / OSError).
_TFDS_MISSING_ERRORS = (
    NotImplementedError,
    KeyError,
    RuntimeError,
    OSError,
    AssertionError,
)


def _tfds_prepare_hint(name: str, data_dir: str | None) -> str:
  """Instructions for preparing a TFDS dataset readable without TensorFlow."""
  target = data_dir or "$TFDS_DATA_DIR (default ~/tensorflow_datasets)"
  return (
      f"Prepare it once, in the array_record format, on a machine with internet"
      f" access: `pip install 'softjax[tfds-prepare]'` (TensorFlow is needed"
      f" only to encode the images while preparing), then `tfds build {name}"
      f" --data_dir=DIR --file_format=array_record`, and copy DIR here and pass"
      f" it as data_dir (looked in: {target})."
  )


def _read_tfds_split(
    name: str, split: str, data_dir: str | None
) -> tuple[np.ndarray, np.ndarray]:
  """Reads one whole TFDS split into numpy through `tfds.data_source`.

  The Image feature needs no TensorFlow here: `data_source` decodes each record
  with the NumPy code path of TFDS (the Example proto is parsed by
  `ExampleParserNp` and the PNG bytes are decoded by OpenCV, or by Pillow when
  OpenCV is absent), so only `tfds build` needs TensorFlow.

  Records are read one by one with `ds[i]` rather than `ds.__getitems__`: both
  cost the same here (PNG decoding dominates), and `tfds.testing.mock_data`
  only implements per-record access correctly.

  Args:
    name: TFDS dataset name.
    split: split name, e.g. "train".
    data_dir: TFDS data directory, or None for the TFDS default.

  Returns:
    (images uint8 [N, H, W, C], labels int32 [N]).

  Raises:
    DatasetNotFoundError: if the split is not prepared in `data_dir`.
  """
  # Imported here because importing TFDS takes about a second and only the
  # TFDS sources need it.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    source = tfds.data_source(
        name, split=split, data_dir=data_dir, download=False
    )
    n = len(source)
    first = source[0] if n else None
  except _TFDS_MISSING_ERRORS as err:
    raise DatasetNotFoundError(
        f"TFDS dataset {name!r} (split {split!r}) is not prepared in"
        f" array_record format. {_tfds_prepare_hint(name, data_dir)}"
        f" [TFDS said: {type(err).__name__}: {err}]"
    ) from err
  if first is None:
    raise DatasetNotFoundError(
        f"TFDS dataset {name!r} split {split!r} is empty."
        f" {_tfds_prepare_hint(name, data_dir)}"
    )
  first_image = np.asarray(first["image"])
  # Fill preallocated arrays so peak memory stays at one copy of the split.
  images = np.empty((n,) + first_image.shape, np.uint8)
  labels = np.empty((n,), np.int32)
  for i in range(n):
    record = first if i == 0 else source[i]
    images[i] = record["image"]
    labels[i] = record["label"]
  if images.ndim == 3:  # grayscale stored without a channel axis
    images = images[..., None]
  return images, labels
