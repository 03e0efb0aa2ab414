"""Image classification data sources, loaded by name into host numpy arrays.

Every source returns a `Dataset` of whole splits held in memory as uint8 images
`[N, H, W, C]` (grayscale gets `C = 1`) and int32 labels `[N]`. The federated
loop copies these arrays to the device once and gathers batches there, so a
source only has to produce complete arrays; there is no streaming pipeline.

Sources register themselves by name with `register_source`; `load_dataset(name)`
is the single entry point used by experiments.

Nothing here downloads anything. TFDS sources are read with
`tfds.data_source(..., download=False)` from an already prepared `array_record`
directory, and a missing dataset raises `DatasetNotFoundError` whose message says
how to obtain it.
"""

from __future__ import annotations

from collections.abc import Callable
import os
from typing import NamedTuple

from absl import logging
import numpy as np

from softjax.data.readers import _read_idx_pair, _read_tfds_split
from softjax.errors import DatasetCorruptError, DatasetNotFoundError

FASHION_MNIST_ENV = "SOFTJAX_FASHION_MNIST_DIR"


FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"


# Constant seed of the digits train/test split: the split is part of the
# dataset's definition, so it must not follow an experiment's seed.
DIGITS_SPLIT_SEED = 20240601


DIGITS_TEST_FRACTION = 0.2


class Dataset(NamedTuple):
  """A classification dataset held in host memory.

  Attributes:
    name: registry name of the source.
    train_images: uint8 `[N_train, H, W, C]`.
    train_labels: int32 `[N_train]`, values in `[0, num_classes)`.
    test_images: uint8 `[N_test, H, W, C]`.
    test_labels: int32 `[N_test]`.
    num_classes: number of classes.
  """

  name: str
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int


SourceFn = Callable[[str | None], Dataset]


# name -> loader(data_dir) -> Dataset.
SOURCES: dict[str, SourceFn] = {}


def register_source(name: str) -> Callable[[SourceFn], SourceFn]:
  """Decorator registering a loader `fn(data_dir) -> Dataset` under `name`.

  Args:
    name: the name `load_dataset` will accept.

  Returns:
    A decorator that records the function in `SOURCES` and returns it unchanged.

  Raises:
    ValueError: if `name` is already registered (a silent overwrite would make
      `load_dataset` return data from the wrong loader).
  """

  def decorator(fn: SourceFn) -> SourceFn:
    if name in SOURCES:
      raise ValueError(f"data source {name!r} is already registered")
    SOURCES[name] = fn
    return fn

  return decorator


def available_sources() -> list[str]:
  """Returns the registered source names, sorted."""
  return sorted(SOURCES)


def load_dataset(name: str, data_dir: str | None = None) -> Dataset:
  """Loads a registered dataset into host memory.

  Args:
    name: a registered source name (see `available_sources()`).
    data_dir: optional TFDS data directory holding prepared `array_record`
      data; sources that do not use TFDS may ignore it.

  Returns:
    The `Dataset`, checked for dtypes, shapes and label range.

  Raises:
    ValueError: if `name` is not registered.
    DatasetNotFoundError: if the data is not on this machine, or `data_dir` is given and is not
      a directory (a typo there is never ignored).
  """
  if name not in SOURCES:
    raise ValueError(
        f"unknown dataset {name!r}; registered sources: {available_sources()}"
    )
  if data_dir and not os.path.isdir(os.path.expanduser(data_dir)):
    raise DatasetNotFoundError(
        f"config.data.data_dir = {data_dir!r} is not a directory; give the directory that holds "
        f"the prepared {name} data, or '' for the source's default location")
  dataset = SOURCES[name](os.path.expanduser(data_dir) if data_dir else data_dir)
  _check_dataset(dataset)
  return dataset


def _check_dataset(ds: Dataset) -> None:
  """Raises ValueError if a loader broke the `Dataset` conventions.

  Checking once here keeps a loader bug from surfacing later as a shape error
  deep inside a jitted round.
  """
  for split in ("train", "test"):
    images = getattr(ds, f"{split}_images")
    labels = getattr(ds, f"{split}_labels")
    if images.dtype != np.uint8 or images.ndim != 4:
      raise ValueError(
          f"{ds.name}: {split}_images must be uint8 [N,H,W,C], got "
          f"{images.dtype} {images.shape}"
      )
    if labels.dtype != np.int32 or labels.shape != images.shape[:1]:
      raise ValueError(
          f"{ds.name}: {split}_labels must be int32 [{images.shape[0]}], got "
          f"{labels.dtype} {labels.shape}"
      )
    if labels.size and (labels.min() < 0 or labels.max() >= ds.num_classes):
      raise ValueError(
          f"{ds.name}: {split}_labels outside [0, {ds.num_classes})"
      )
  if ds.train_images.shape[1:] != ds.test_images.shape[1:]:
    raise ValueError(f"{ds.name}: train and test image shapes differ")


_FASHION_MNIST_FILES = tuple(
    f"{split}-{kind}-ubyte.gz"
    for split in ("train", "t10k")
    for kind in ("images-idx3", "labels-idx1")
)


def _tfds_dataset(
    name: str, num_classes: int, data_dir: str | None
) -> Dataset:
  """Loads the train and test splits of a TFDS dataset into a `Dataset`."""
  train_images, train_labels = _read_tfds_split(name, "train", data_dir)
  test_images, test_labels = _read_tfds_split(name, "test", data_dir)
  return Dataset(
      name=name,
      train_images=train_images,
      train_labels=train_labels,
      test_images=test_images,
      test_labels=test_labels,
      num_classes=num_classes,
  )


@register_source("fashion_mnist")
def fashion_mnist(data_dir: str | None = None) -> Dataset:
  """Fashion-MNIST: 60,000 train / 10,000 test 28x28 grayscale images, 10 classes.

  Looks, in order, for a prepared TFDS `fashion_mnist` in `data_dir` (only if
  `data_dir` is given), then for the official idx `.gz` files in
  `$SOFTJAX_FASHION_MNIST_DIR` if set, else in
  /usr/share/datasets/fashion-mnist (Debian package `dataset-fashion-mnist`).
  An explicitly set environment variable is not followed by the system
  directory, so pointing it somewhere really selects that copy.

  Args:
    data_dir: optional TFDS data directory.

  Returns:
    The `Dataset` with images `[N, 28, 28, 1]`.

  Raises:
    DatasetNotFoundError: if neither the TFDS data nor the idx files exist.
    DatasetCorruptError: naming the file, if an idx file cannot be read.
  """
  tfds_error = None
  if data_dir is not None:
    try:
      return _tfds_dataset("fashion_mnist", 10, data_dir)
    except DatasetNotFoundError as err:
      tfds_error = err
      logging.info("no TFDS fashion_mnist in %s; trying the idx files", data_dir)

  tfds_note = (
      f" A TFDS data_dir was given ({data_dir}) but holds no prepared"
      f" fashion_mnist: {tfds_error}" if tfds_error else ""
  )
  directory = os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_SYSTEM_DIR
  return _fashion_mnist_idx(directory, tfds_note)


def _fashion_mnist_idx(directory: str, tfds_note: str) -> Dataset:
  """Fashion-MNIST from the four official idx `.gz` files in `directory`."""
  missing = [
      f for f in _FASHION_MNIST_FILES
      if not os.path.isfile(os.path.join(directory, f))
  ]
  if missing:
    raise DatasetNotFoundError(
        f"Fashion-MNIST idx files not found in {directory} (missing:"
        f" {', '.join(missing)}). Install them with `sudo apt-get install"
        f" dataset-fashion-mnist` (files land in {FASHION_MNIST_SYSTEM_DIR}),"
        f" or download the four official *-ubyte.gz files into a directory"
        f" and set ${FASHION_MNIST_ENV} to it.{tfds_note}"
    )
  try:
    train_images, train_labels = _read_idx_pair(directory, "train")
    test_images, test_labels = _read_idx_pair(directory, "t10k")
  except ValueError as err:
    raise DatasetCorruptError(
        f"{err}. Replace the damaged file: `sudo apt-get install --reinstall"
        f" dataset-fashion-mnist` (files land in {FASHION_MNIST_SYSTEM_DIR}),"
        f" or download the four official *-ubyte.gz files again into {directory}."
    ) from err
  return Dataset(
      name="fashion_mnist",
      train_images=train_images,
      train_labels=train_labels,
      test_images=test_images,
      test_labels=test_labels,
      num_classes=10,
  )


@register_source("digits")
def digits(data_dir: str | None = None) -> Dataset:
  """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes).

  Pixel values 0..16 are rescaled to uint8 0..255 (rounded) so every source
  shares the same preprocessing. The train/test split is stratified: within
  each class, a permutation drawn with the constant `DIGITS_SPLIT_SEED` puts
  `round(DIGITS_TEST_FRACTION * class_size)` examples in test. It is the same
  on every call and every machine.

  Args:
    data_dir: ignored (the data ships inside scikit-learn).

  Returns:
    The `Dataset` with images `[n, 8, 8, 1]`.
  """
  del data_dir
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top

  bunch = sk_datasets.load_digits()
  images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = bunch.target.astype(np.int32)
  test_idx = _stratified_test_indices(
      labels, DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED
  )
  is_test = np.zeros(labels.shape[0], bool)
  is_test[test_idx] = True
  return Dataset(
      name="digits",
      train_images=images[~is_test],
      train_labels=labels[~is_test],
      test_images=images[is_test],
      test_labels=labels[is_test],
      num_classes=10,
  )


def _stratified_test_indices(
    labels: np.ndarray, test_fraction: float, seed: int
) -> np.ndarray:
  """Picks a seeded, per-class `test_fraction` of the indices, sorted."""
  rng = np.random.default_rng(seed)
  chosen = []
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    n_test = int(round(test_fraction * members.size))
    chosen.append(rng.permutation(members)[:n_test])
  return np.sort(np.concatenate(chosen))


@register_source("cifar10")
def cifar10(data_dir: str | None = None) -> Dataset:
  """CIFAR-10 (50,000 train / 10,000 test 32x32 RGB, 10 classes) from TFDS.

  Args:
    data_dir: TFDS data directory holding `cifar10` prepared as array_record,
      or None for the TFDS default directory.

  Returns:
    The `Dataset` with images `[N, 32, 32, 3]`.

  Raises:
    DatasetNotFoundError: if the data is not prepared there.
  """
  return _tfds_dataset("cifar10", 10, data_dir)


@register_source("cifar100")
def cifar100(data_dir: str | None = None) -> Dataset:
  """CIFAR-100 with its 100 fine labels (TFDS feature `label`) from TFDS.

  Args:
    data_dir: TFDS data directory holding `cifar100` prepared as array_record,
      or None for the TFDS default directory.

  Returns:
    The `Dataset` with images `[N, 32, 32, 3]`.

  Raises:
    DatasetNotFoundError: if the data is not prepared there.
  """
  return _tfds_dataset("cifar100", 100, data_dir)


def pretrain_federated_split(
    num_train: int, pretrain_fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
  """Splits training indices into a central pretraining part and a federated part.

  The two parts are disjoint, so a backbone pretrained centrally never sees the
  examples later held by the federated clients.

  Args:
    num_train: number of training examples.
    pretrain_fraction: fraction in [0, 1] going to pretraining (rounded to the
      nearest count).
    seed: seed of the permutation; the split is a pure function of the
      arguments.

  Returns:
    (pretrain_idx, federated_idx): sorted int64 index arrays whose union is
    `range(num_train)`.

  Raises:
    ValueError: if `num_train < 0` or `pretrain_fraction` is outside [0, 1].
  """
  if num_train < 0:
    raise ValueError(f"num_train must be >= 0, got {num_train}")
  if not 0.0 <= pretrain_fraction <= 1.0:
    raise ValueError(
        f"pretrain_fraction must be in [0, 1], got {pretrain_fraction}"
    )
  n_pretrain = int(round(pretrain_fraction * num_train))
  order = np.random.default_rng(seed).permutation(num_train)
  return np.sort(order[:n_pretrain]), np.sort(order[n_pretrain:])
