"""Tests of softjax.data: sources, partitions and device-side batching."""

from __future__ import annotations

import gzip
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softjax.data import batching, readers, sources
from softjax.data import partition as partition_lib
from tests.support import write_idx

FASHION_DIR = sources.FASHION_MNIST_SYSTEM_DIR
HAVE_FASHION = all(
    os.path.isfile(os.path.join(FASHION_DIR, f))
    for f in sources._FASHION_MNIST_FILES  # pylint: disable=protected-access
)
needs_fashion = pytest.mark.skipif(
    not HAVE_FASHION,
    reason=f"Fashion-MNIST idx files absent from {FASHION_DIR}"
    " (sudo apt-get install dataset-fashion-mnist)",
)


# ---------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------


def _assert_dataset(ds, image_shape, num_classes, n_train=None, n_test=None):
  """Checks the `Dataset` conventions shared by every source."""
  assert ds.num_classes == num_classes
  for images, labels, n in (
      (ds.train_images, ds.train_labels, n_train),
      (ds.test_images, ds.test_labels, n_test),
  ):
    chex.assert_type([images, labels], [np.uint8, np.int32])
    chex.assert_shape(images, (n,) + image_shape if n else (None,) + image_shape)
    chex.assert_shape(labels, images.shape[:1])
    assert labels.min() >= 0 and labels.max() < num_classes


def test_registry_lists_sources_and_rejects_unknown_names():
  assert {"fashion_mnist", "digits", "cifar10", "cifar100"} <= set(
      sources.available_sources()
  )
  with pytest.raises(ValueError, match="registered sources.*fashion_mnist"):
    sources.load_dataset("imagenet_typo")


def test_register_source_refuses_duplicates():
  with pytest.raises(ValueError, match="already registered"):
    sources.register_source("digits")(lambda data_dir: None)


def test_register_source_makes_a_loader_loadable():
  def tiny(data_dir):
    del data_dir
    images = np.zeros((4, 2, 2, 1), np.uint8)
    labels = np.array([0, 1, 0, 1], np.int32)
    return sources.Dataset("tiny_test_source", images, labels, images, labels, 2)

  sources.register_source("tiny_test_source")(tiny)
  try:
    ds = sources.load_dataset("tiny_test_source")
    _assert_dataset(ds, (2, 2, 1), 2, 4, 4)
  finally:
    del sources.SOURCES["tiny_test_source"]


def test_load_dataset_rejects_a_malformed_source():
  def broken(data_dir):
    del data_dir
    images = np.zeros((4, 2, 2, 1), np.uint8)
    labels = np.array([0, 1, 0, 5], np.int32)  # 5 >= num_classes
    return sources.Dataset("broken_test_source", images, labels, images, labels, 2)

  sources.register_source("broken_test_source")(broken)
  try:
    with pytest.raises(ValueError, match="labels outside"):
      sources.load_dataset("broken_test_source")
  finally:
    del sources.SOURCES["broken_test_source"]


def test_read_idx_parses_the_big_endian_header(tmp_path):
  values = np.arange(-6, 6, dtype=np.int32).reshape(3, 2, 2) * 1000
  path = str(tmp_path / "x-idx3-int.gz")
  write_idx(path, values, 0x0C, ">i4")
  out = readers.read_idx(path)
  np.testing.assert_array_equal(out, values)
  assert out.dtype.isnative


def test_read_idx_rejects_a_truncated_file(tmp_path):
  path = str(tmp_path / "bad.gz")
  write_idx(path, np.zeros((2, 3), np.uint8), 0x08, np.uint8)
  with gzip.open(path, "rb") as f:
    raw = f.read()
  with gzip.open(path, "wb") as f:
    f.write(raw[:-1])
  with pytest.raises(ValueError, match="payload"):
    readers.read_idx(path)


@needs_fashion
def test_fashion_mnist_from_debian_idx_files():
  ds = sources.load_dataset("fashion_mnist")
  _assert_dataset(ds, (28, 28, 1), 10, 60_000, 10_000)
  np.testing.assert_array_equal(np.bincount(ds.train_labels), [6000] * 10)
  np.testing.assert_array_equal(np.bincount(ds.test_labels), [1000] * 10)
  assert ds.train_images.max() == 255 and ds.train_images.min() == 0


def test_fashion_mnist_env_var_selects_the_idx_directory(tmp_path, monkeypatch):
  rng = np.random.default_rng(0)
  for prefix, n in (("train", 6), ("t10k", 4)):
    write_idx(
        str(tmp_path / f"{prefix}-images-idx3-ubyte.gz"),
        rng.integers(0, 256, (n, 28, 28)), 0x08, np.uint8,
    )
    write_idx(
        str(tmp_path / f"{prefix}-labels-idx1-ubyte.gz"),
        np.arange(n) % 10, 0x08, np.uint8,
    )
  monkeypatch.setenv(sources.FASHION_MNIST_ENV, str(tmp_path))
  ds = sources.load_dataset("fashion_mnist")
  _assert_dataset(ds, (28, 28, 1), 10, 6, 4)


def test_fashion_mnist_missing_data_error(tmp_path, monkeypatch):
  empty = tmp_path / "empty"
  empty.mkdir()
  monkeypatch.setenv(sources.FASHION_MNIST_ENV, str(empty))
  (tmp_path / "no_tfds").mkdir()  # a data_dir that exists but holds no prepared TFDS data
  with pytest.raises(sources.DatasetNotFoundError, match="apt-get install") as e:
    sources.load_dataset("fashion_mnist", data_dir=str(tmp_path / "no_tfds"))
  assert isinstance(e.value, FileNotFoundError)
  assert sources.FASHION_MNIST_ENV in str(e.value)


def test_digits_shapes_and_deterministic_stratified_split():
  ds = sources.load_dataset("digits")
  again = sources.load_dataset("digits")
  _assert_dataset(ds, (8, 8, 1), 10)
  assert ds.train_images.shape[0] + ds.test_images.shape[0] == 1797
  assert ds.test_images.shape[0] == pytest.approx(0.2 * 1797, abs=10)
  assert ds.train_images.max() == 255
  chex.assert_trees_all_equal(tuple(ds), tuple(again))
  # Stratified: every class keeps about 20 % of its examples in test.
  test_share = np.bincount(ds.test_labels) / (
      np.bincount(ds.test_labels) + np.bincount(ds.train_labels)
  )
  np.testing.assert_allclose(test_share, 0.2, atol=0.01)


@pytest.mark.parametrize("name,num_classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_through_tfds_mock_data(name, num_classes, tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  # USE_CODE fakes the records from the builder's feature spec, with no files
  # and no TensorFlow; `data_dir` is ignored by the mock.
  with tfds.testing.mock_data(
      num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE
  ):
    ds = sources.load_dataset(name, data_dir=str(tmp_path))
  _assert_dataset(ds, (32, 32, 3), num_classes, 12, 12)


def test_cifar_missing_data_error(tmp_path):
  with pytest.raises(sources.DatasetNotFoundError, match="tfds build cifar100"):
    sources.load_dataset("cifar100", data_dir=str(tmp_path))


def _prepare_fake_tfds(data_dir, name, version, image_shape, num_classes, sizes):
  """Writes a real array_record TFDS directory for `name`, without TensorFlow.

  A builder with the official name, version and features (Image + ClassLabel)
  is defined outside the registry, so `tfds.data_source(name)` later resolves
  to the official builder and reads these files. Images are handed over as
  PIL images, which TFDS encodes to PNG with Pillow (numpy images would need
  TensorFlow's encoder).

  Returns:
    {split: (images, labels)} as written.
  """
  import PIL.Image  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core import registered  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(1)
  written = {
      split: (
          rng.integers(0, 256, (n,) + image_shape, dtype=np.uint8),
          rng.integers(0, num_classes, n).astype(np.int32),
      )
      for split, n in sizes.items()
  }

  def to_pil(image):
    return PIL.Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)

  with registered.skip_registration():

    class FakeBuilder(tfds.core.GeneratorBasedBuilder):
      VERSION = tfds.core.Version(version)

      def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=image_shape),
                "label": tfds.features.ClassLabel(num_classes=num_classes),
            }),
        )

      def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in written}

      def _generate_examples(self, split):
        images, labels = written[split]
        for i, (image, label) in enumerate(zip(images, labels)):
          yield i, {"image": to_pil(image), "label": int(label)}

    FakeBuilder.name = name
    FakeBuilder(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return written


def _sorted_by_content(images, labels):
  """Puts examples in a canonical order (TFDS shuffles records on write)."""
  order = np.lexsort(images.reshape(images.shape[0], -1).T)
  return images[order], labels[order]


@pytest.mark.parametrize(
    "name,version,image_shape,num_classes",
    [
        ("cifar10", "3.0.2", (32, 32, 3), 10),
        ("fashion_mnist", "3.0.1", (28, 28, 1), 10),
    ],
)
def test_prepared_array_record_is_read_without_tensorflow(
    name, version, image_shape, num_classes, tmp_path
):
  data_dir = str(tmp_path)
  written = _prepare_fake_tfds(
      data_dir, name, version, image_shape, num_classes,
      {"train": 30, "test": 10},
  )
  ds = sources.load_dataset(name, data_dir=data_dir)
  _assert_dataset(ds, image_shape, num_classes, 30, 10)
  for split in ("train", "test"):
    got = _sorted_by_content(
        getattr(ds, f"{split}_images"), getattr(ds, f"{split}_labels")
    )
    chex.assert_trees_all_equal(got, _sorted_by_content(*written[split]))


def test_pretrain_federated_split_is_disjoint_and_covering():
  pre, fed = sources.pretrain_federated_split(1000, 0.3, seed=4)
  assert pre.size == 300 and fed.size == 700
  assert np.intersect1d(pre, fed).size == 0
  np.testing.assert_array_equal(np.sort(np.concatenate([pre, fed])), np.arange(1000))
  pre2, fed2 = sources.pretrain_federated_split(1000, 0.3, seed=4)
  chex.assert_trees_all_equal((pre, fed), (pre2, fed2))
  assert not np.array_equal(pre, sources.pretrain_federated_split(1000, 0.3, 5)[0])
  assert sources.pretrain_federated_split(10, 0.0)[0].size == 0
  with pytest.raises(ValueError, match="pretrain_fraction"):
    sources.pretrain_federated_split(10, 1.5)


# ---------------------------------------------------------------------------
# Partitions
# ---------------------------------------------------------------------------

NUM_CLASSES = 10


def _balanced_labels(per_class=60, seed=0):
  """Shuffled labels with `per_class` examples of each of NUM_CLASSES classes."""
  labels = np.repeat(np.arange(NUM_CLASSES), per_class).astype(np.int32)
  return np.random.default_rng(seed).permutation(labels)


def _partition(kind, labels, num_clients=10, seed=0, **kw):
  return partition_lib.partition(
      labels, num_clients, kind, rng=np.random.default_rng(seed), **kw
  )


@pytest.mark.parametrize("kind", partition_lib.PARTITIONS)
def test_partition_assigns_every_index_exactly_once(kind):
  labels = _balanced_labels()
  parts = _partition(kind, labels, num_clients=7)
  assert len(parts) == 7
  everything = np.concatenate(parts)
  assert everything.size == labels.size
  np.testing.assert_array_equal(np.sort(everything), np.arange(labels.size))
  assert sum(p.size for p in parts) == labels.size
  assert all(p.size >= 1 for p in parts)
  assert all(np.issubdtype(p.dtype, np.integer) for p in parts)


@pytest.mark.parametrize("kind", partition_lib.PARTITIONS)
def test_partition_is_deterministic_under_a_seed(kind):
  labels = _balanced_labels()
  a = _partition(kind, labels, seed=3)
  b = _partition(kind, labels, seed=3)
  c = _partition(kind, labels, seed=4)
  chex.assert_trees_all_equal(a, b)
  assert any(not np.array_equal(x, y) for x, y in zip(a, c))


def test_iid_sizes_are_equal_up_to_one():
  sizes = [p.size for p in _partition("iid", _balanced_labels(), num_clients=7)]
  assert max(sizes) - min(sizes) <= 1


def test_shards_limit_labels_per_client():
  # 600 examples / (10 clients * 2 shards) = 30 per shard, which divides the
  # 60 examples per class, so every shard holds a single label.
  labels = _balanced_labels(per_class=60)
  parts = _partition("shards", labels, num_clients=10, shards_per_client=2)
  hist = partition_lib.label_histogram(labels, parts, NUM_CLASSES)
  chex.assert_shape(hist, (10, NUM_CLASSES))
  labels_per_client = (hist > 0).sum(axis=1)
  assert labels_per_client.max() <= 2
  assert all(p.size == 60 for p in parts)
  # IID by contrast spreads nearly all labels over every client.
  iid_hist = partition_lib.label_histogram(labels, _partition("iid", labels), NUM_CLASSES)
  assert (iid_hist > 0).sum(axis=1).mean() > 8


def _mean_max_class_fraction(labels, parts):
  hist = partition_lib.label_histogram(labels, parts, NUM_CLASSES)
  return float((hist.max(axis=1) / hist.sum(axis=1)).mean())


def test_dirichlet_skew_grows_as_alpha_shrinks():
  labels = _balanced_labels(per_class=200)
  skew = {
      alpha: np.mean([
          _mean_max_class_fraction(
              labels,
              _partition("dirichlet", labels, seed=s, dirichlet_alpha=alpha),
          )
          for s in range(3)
      ])
      for alpha in (0.05, 1.0, 100.0)
  }
  assert skew[0.05] > skew[1.0] > skew[100.0]
  assert skew[0.05] > 0.5 and skew[100.0] < 0.2


def test_dirichlet_respects_min_size():
  labels = _balanced_labels(per_class=30)
  parts = _partition("dirichlet", labels, num_clients=10, dirichlet_alpha=0.1,
                     min_size=5)
  assert min(p.size for p in parts) >= 5


def test_dirichlet_gives_up_with_a_clear_error():
  labels = np.zeros(20, np.int32)  # one class, 20 examples, alpha tiny
  with pytest.raises(ValueError, match="min_size"):
    _partition("dirichlet", labels, num_clients=4, dirichlet_alpha=1e-3,
               min_size=5)


@pytest.mark.parametrize(
    "kwargs,argument",
    [
        (dict(kind="pathological"), "kind"),
        (dict(num_clients=601), "num_clients"),
        (dict(num_clients=0), "num_clients"),
        (dict(kind="shards", shards_per_client=0), "shards_per_client"),
        (dict(kind="shards", num_clients=400, shards_per_client=2),
         "shards_per_client"),
        (dict(kind="dirichlet", dirichlet_alpha=0.0), "dirichlet_alpha"),
        (dict(kind="dirichlet", min_size=100), "min_size"),
    ],
)
def test_partition_rejects_bad_arguments(kwargs, argument):
  args = dict(kind="iid", num_clients=10) | kwargs
  with pytest.raises(ValueError, match=argument):
    partition_lib.partition(_balanced_labels(), args.pop("num_clients"), args.pop("kind"),
                   rng=np.random.default_rng(0), **args)


def test_pad_client_indices_table():
  parts = [np.array([5, 1, 9]), np.array([], np.int64), np.array([7])]
  table = partition_lib.pad_client_indices(parts)
  chex.assert_type([table.indices, table.counts], [np.int32, np.int32])
  chex.assert_shape(table.indices, (3, 3))
  np.testing.assert_array_equal(table.counts, [3, 0, 1])
  np.testing.assert_array_equal(table.indices, [[5, 1, 9], [0, 0, 0], [7, 0, 0]])


def test_pad_client_indices_round_trips_a_partition():
  labels = _balanced_labels()
  parts = _partition("dirichlet", labels, num_clients=8)
  table = partition_lib.pad_client_indices(parts)
  chex.assert_shape(table.indices, (8, max(p.size for p in parts)))
  for row, count, part in zip(table.indices, table.counts, parts):
    np.testing.assert_array_equal(row[:count], part)
    assert not row[count:].any()


# ---------------------------------------------------------------------------
# Device batching
# ---------------------------------------------------------------------------


def test_preprocess_range_and_shape():
  x = jnp.array([[0, 255], [51, 204]], jnp.uint8)
  y = batching.preprocess(x)
  chex.assert_type(y, jnp.float32)
  chex.assert_shape(y, x.shape)
  np.testing.assert_allclose(y, (np.asarray(x) / 255.0 - 0.5) / 0.5, atol=1e-6)
  assert y.min() == -1.0 and y.max() == 1.0


MAX_N = 13


def test_client_permutation_puts_valid_positions_first_under_jit():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def permute(key, count):
    return batching.client_permutation(key, count, MAX_N)

  for i, count in enumerate([0, 1, 2, 7, MAX_N - 1, MAX_N]):
    perm = np.asarray(permute(jax.random.key(i), jnp.int32(count)))
    chex.assert_shape(perm, (MAX_N,))
    assert perm.dtype == np.int32
    np.testing.assert_array_equal(np.sort(perm[:count]), np.arange(count))
    np.testing.assert_array_equal(perm[count:], np.arange(count, MAX_N))


def test_client_permutation_is_random_and_key_determined():
  perms = {
      tuple(np.asarray(batching.client_permutation(jax.random.key(s), 10, MAX_N)))
      for s in range(20)
  }
  assert len(perms) > 15
  a = batching.client_permutation(jax.random.key(3), 10, MAX_N)
  b = batching.client_permutation(jax.random.key(3), 10, MAX_N)
  chex.assert_trees_all_equal(a, b)


@pytest.mark.parametrize("count,batch_size", [(1, 4), (5, 4), (12, 4), (13, 5)])
def test_batch_positions_cover_an_epoch_and_skip_padding(count, batch_size):
  @jax.jit
  def epoch(key, count):
    perm = batching.client_permutation(key, count, MAX_N)
    steps = jnp.arange(2 * MAX_N)
    return jax.vmap(
        lambda s: batching.batch_positions(perm, count, s, batch_size)
    )(steps), perm

  positions, perm = epoch(jax.random.key(count), jnp.int32(count))
  positions, perm = np.asarray(positions), np.asarray(perm)
  assert positions.dtype == np.int32
  assert positions.max() < count and positions.min() >= 0
  flat = positions.reshape(-1)
  # The first `count` draws are one epoch: every valid position exactly once,
  # in permutation order; later epochs repeat the same order.
  np.testing.assert_array_equal(flat[:count], perm[:count])
  np.testing.assert_array_equal(
      flat, np.resize(perm[:count], flat.size)
  )


def test_gather_batch_matches_numpy():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (40, 6, 5, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, 40).astype(np.int32)
  parts = _partition("iid", labels, num_clients=3)
  table = partition_lib.pad_client_indices(parts)
  k, step, batch_size = 1, 2, 4
  count = table.counts[k]

  @jax.jit
  def batch(images, labels, row, count, key):
    perm = batching.client_permutation(key, count, row.shape[0])
    positions = batching.batch_positions(perm, count, step, batch_size)
    return batching.gather_batch(images, labels, row, positions), perm

  (x, y), perm = batch(
      jnp.asarray(images), jnp.asarray(labels), jnp.asarray(table.indices[k]),
      jnp.int32(count), jax.random.key(7),
  )
  chex.assert_type([x, y], [jnp.float32, jnp.int32])
  chex.assert_shape([x, y], [(batch_size, 6, 5, 3), (batch_size,)])
  pos = np.asarray(perm)[(step * batch_size + np.arange(batch_size)) % count]
  idx = table.indices[k][pos]
  assert set(idx) <= set(parts[k])
  np.testing.assert_allclose(
      x, (images[idx].astype(np.float32) / 255.0 - 0.5) / 0.5, atol=1e-6
  )
  np.testing.assert_array_equal(y, labels[idx])


def test_host_modules_do_not_import_jax():
  # batching.py is the only jax module of the package; the host modules stay
  # numpy-only so data preparation never needs to touch a device.
  assert "jax" not in vars(partition_lib) and "jax" not in vars(sources)
  assert "jax" in vars(batching)
