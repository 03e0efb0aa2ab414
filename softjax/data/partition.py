"""Splitting a labelled training set among simulated federated clients (host numpy).

Three schemes, all drawing randomness only from the `np.random.Generator` they
are given so a partition is a pure function of its seed:

- "iid": a uniformly random split into near-equal parts.
- "shards": the label-sorted shards of McMahan et al. (2017), "Communication-
  Efficient Learning of Deep Networks from Decentralized Data", section 3: each
  client gets a few contiguous runs of one or two labels.
- "dirichlet": per-class Dirichlet(alpha) proportions (Hsu et al. 2019,
  "Measuring the Effects of Non-Identical Data Distribution for Federated
  Visual Classification"); small alpha gives strong label skew.

`pad_client_indices` turns the ragged result into the fixed-shape table the
device-side batching gathers from.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from softjax.config.choices import PARTITIONS  # noqa: F401  (re-exported)

# Attempts at drawing a Dirichlet partition that gives every client at least
# `min_size` examples before giving up.
DIRICHLET_MAX_TRIES = 1000


class ClientTable(NamedTuple):
  """Per-client example indices padded to one static shape.

  Attributes:
    indices: int32 `[num_clients, max_n]`; row k holds client k's indices into
      the training set in its first `counts[k]` slots, then zeros.
    counts: int32 `[num_clients]`, the number of valid slots per row.
  """

  indices: np.ndarray
  counts: np.ndarray


def partition(
    labels: np.ndarray,
    num_clients: int,
    kind: str,
    *,
    rng: np.random.Generator,
    shards_per_client: int = 2,
    dirichlet_alpha: float = 0.5,
    min_size: int = 1,
) -> list[np.ndarray]:
  """Partitions example indices among clients.

  Args:
    labels: integer labels `[n]` of the examples to split.
    num_clients: number of clients, 1 <= num_clients <= n.
    kind: one of `PARTITIONS`.
    rng: source of all randomness.
    shards_per_client: ("shards") shards per client; needs
      `num_clients * shards_per_client <= n`.
    dirichlet_alpha: ("dirichlet") concentration, > 0; smaller is more skewed.
    min_size: ("dirichlet") minimum examples per client; draws are repeated
      until it holds (iid and shards give every client data by construction).

  Returns:
    `num_clients` sorted int64 arrays of indices into `labels`; every index in
    `range(n)` appears in exactly one of them.

  Raises:
    ValueError: naming the offending argument when it is out of range, or
      `min_size` when no Dirichlet draw satisfies it.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(
        f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}"
    )
  n = labels.shape[0]
  if kind not in PARTITIONS:
    raise ValueError(f"kind must be one of {PARTITIONS}, got {kind!r}")
  if not 1 <= num_clients <= n:
    raise ValueError(
        f"num_clients must be in [1, number of examples = {n}], got"
        f" {num_clients}"
    )
  # Checked whatever the kind, so a bad config fails even while unused.
  if shards_per_client < 1:
    raise ValueError(f"shards_per_client must be >= 1, got {shards_per_client}")
  if not dirichlet_alpha > 0:
    raise ValueError(f"dirichlet_alpha must be > 0, got {dirichlet_alpha}")
  if min_size < 0:
    raise ValueError(f"min_size must be >= 0, got {min_size}")
  if kind == "iid":
    parts = _iid(n, num_clients, rng)
  elif kind == "shards":
    parts = _shards(labels, num_clients, shards_per_client, rng)
  else:
    parts = _dirichlet(labels, num_clients, dirichlet_alpha, min_size, rng)
  return [np.sort(p).astype(np.int64) for p in parts]


def _iid(n: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
  """Uniformly random split; client sizes differ by at most one."""
  return np.array_split(rng.permutation(n), num_clients)


def _shards(
    labels: np.ndarray,
    num_clients: int,
    shards_per_client: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
  """McMahan et al. shards: label-sorted, cut, dealt out at random.

  A shard is one label only when the shard size divides the class sizes (as in
  the original 60,000 / 200-shard MNIST setup); otherwise a shard can straddle
  two adjacent labels.
  """
  num_shards = num_clients * shards_per_client
  if num_shards > labels.shape[0]:
    raise ValueError(
        f"shards_per_client={shards_per_client} with num_clients={num_clients}"
        f" needs {num_shards} shards but there are only {labels.shape[0]}"
        " examples"
    )
  # Shuffling before a stable sort orders the examples by label while leaving
  # the order within a label random, so which examples of a label share a
  # shard depends on the seed rather than on the dataset's file order.
  shuffled = rng.permutation(labels.shape[0])
  by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
  shards = np.array_split(by_label, num_shards)
  deal = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
  return [np.concatenate([shards[s] for s in row]) for row in deal]


def _dirichlet(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    min_size: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
  """Per-class Dirichlet(alpha) split, redrawn until every client has min_size."""
  if min_size * num_clients > labels.shape[0]:
    raise ValueError(
        f"min_size={min_size} is impossible: {num_clients} clients share only"
        f" {labels.shape[0]} examples"
    )
  classes = np.unique(labels)
  members = [np.flatnonzero(labels == c) for c in classes]
  for _ in range(DIRICHLET_MAX_TRIES):
    parts = _dirichlet_draw(members, num_clients, alpha, rng)
    if min(p.size for p in parts) >= min_size:
      return parts
  raise ValueError(
      f"no Dirichlet(alpha={alpha}) partition gave all {num_clients} clients at"
      f" least min_size={min_size} examples in {DIRICHLET_MAX_TRIES} draws;"
      " lower min_size or num_clients, or raise dirichlet_alpha"
  )


def _dirichlet_draw(
    members: Sequence[np.ndarray],
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
) -> list[np.ndarray]:
  """One draw: each class's shuffled examples are cut at Dirichlet proportions."""
  per_client: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
  for idx in members:
    proportions = rng.dirichlet(np.full(num_clients, alpha))
    # Cut points from the cumulative proportions: the pieces always cover the
    # class exactly, whatever the rounding.
    cuts = np.floor(np.cumsum(proportions)[:-1] * idx.size).astype(np.int64)
    for k, piece in enumerate(np.split(rng.permutation(idx), cuts)):
      per_client[k].append(piece)
  return [np.concatenate(pieces) for pieces in per_client]


def pad_client_indices(client_indices: Sequence[np.ndarray]) -> ClientTable:
  """Pads ragged per-client index lists into a `ClientTable`.

  Args:
    client_indices: one integer index array per client (e.g. from `partition`).

  Returns:
    The table; its width is the largest client size (at least 1, so an
    all-empty partition still gives a gatherable shape).

  Raises:
    ValueError: if there are no clients, an array is not 1-D, or an index does
      not fit in int32.
  """
  if len(client_indices) == 0:
    raise ValueError("client_indices must hold at least one client")
  arrays = [np.asarray(ix) for ix in client_indices]
  for k, ix in enumerate(arrays):
    if ix.ndim != 1:
      raise ValueError(f"client {k}: indices must be 1-D, got shape {ix.shape}")
    if ix.size and (ix.min() < 0 or ix.max() > np.iinfo(np.int32).max):
      raise ValueError(f"client {k}: indices must be in [0, 2**31)")
  counts = np.array([ix.size for ix in arrays], np.int32)
  table = np.zeros((len(arrays), max(1, int(counts.max()))), np.int32)
  for k, ix in enumerate(arrays):
    table[k, : ix.size] = ix
  return ClientTable(indices=table, counts=counts)


def label_histogram(
    labels: np.ndarray,
    client_indices: Sequence[np.ndarray],
    num_classes: int,
) -> np.ndarray:
  """Counts each client's examples per class.

  Args:
    labels: integer labels `[n]` in `[0, num_classes)`.
    client_indices: one index array per client.
    num_classes: number of classes.

  Returns:
    int64 `[num_clients, num_classes]`.
  """
  labels = np.asarray(labels)
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"labels must be in [0, num_classes={num_classes})")
  return np.stack([
      np.bincount(labels[np.asarray(ix, np.int64)], minlength=num_classes)
      for ix in client_indices
  ]).astype(np.int64)
