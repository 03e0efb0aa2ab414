"""Device-side batching from padded per-client index tables.

The whole training set sits on the device as uint8 `images [N, H, W, C]` and
int32 `labels [N]`; each client owns one row of a `ClientTable` (its global
example indices, zero-padded to a static width `max_n`, and a `count`). Inside
a jitted round a client

1. draws `permutation = client_permutation(key, count, max_n)` once,
2. at local step `s` takes `positions = batch_positions(permutation, count, s, b)`,
3. gathers `x, y = gather_batch(images, labels, table_row, positions)`.

All functions are pure jax with static shapes, so they trace inside
`jit`/`scan`/`vmap` and a new `count` never recompiles. Padding slots are
never read: positions are taken modulo `count` from the valid prefix of the
permutation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def preprocess(images_uint8: jax.Array) -> jax.Array:
  """Scales uint8 pixels to float32 in [-1, 1].

  Args:
    images_uint8: uint8 array of any shape (jax or numpy).

  Returns:
    float32 array of the same shape, `(x / 255 - 0.5) / 0.5`, the input range
    the standard ViT checkpoints were trained with.
  """
  x = jnp.asarray(images_uint8, jnp.float32) / 255.0
  return (x - 0.5) / 0.5


def client_permutation(
    key: jax.Array, count: jax.Array | int, max_n: int
) -> jax.Array:
  """A random order of a client's valid positions, padding positions last.

  Args:
    key: PRNG key.
    count: number of valid positions (traced int scalar), `0 <= count <= max_n`.
    max_n: static table width.

  Returns:
    int32 `[max_n]`: a uniformly random permutation of `0..count-1` in the
    first `count` slots, then `count..max_n-1` in increasing order.
  """
  positions = jnp.arange(max_n, dtype=jnp.int32)
  is_padding = (positions >= count).astype(jnp.uint32)
  # Random 32-bit keys order the valid positions; sorting on (is_padding, key)
  # keeps them ahead of all padding. Integer keys avoid the float ties and
  # rounding of a "random + offset" trick, and lax.sort is stable, so the rare
  # equal keys still give a valid permutation.
  random_keys = jax.random.bits(key, (max_n,), jnp.uint32)
  random_keys = jnp.where(is_padding == 1, jnp.uint32(0), random_keys)
  _, _, order = jax.lax.sort(
      (is_padding, random_keys, positions), num_keys=2, is_stable=True
  )
  return order


def batch_positions(
    permutation: jax.Array,
    count: jax.Array | int,
    step: jax.Array | int,
    batch_size: int,
) -> jax.Array:
  """Table positions of the batch for one local step.

  Consecutive steps walk the permutation without replacement and wrap around
  after `count` examples (one epoch), so a client with fewer than `batch_size`
  examples repeats some within a batch.

  Args:
    permutation: int32 `[max_n]` from `client_permutation`.
    count: number of valid positions (traced int scalar); a client with
      `count == 0` gets position `permutation[0]` (padding) and must be masked
      by the caller.
    step: local step index (traced int scalar).
    batch_size: static batch size.

  Returns:
    int32 `[batch_size]`,
    `permutation[(step * batch_size + arange(batch_size)) % count]`.
  """
  # Guarding the modulus keeps count == 0 from an integer division by zero,
  # whose result is backend-defined.
  count = jnp.maximum(jnp.asarray(count, jnp.int32), 1)
  offsets = jnp.asarray(step, jnp.int32) * batch_size + jnp.arange(
      batch_size, dtype=jnp.int32
  )
  return permutation[offsets % count].astype(jnp.int32)


def gather_batch(
    images: jax.Array,
    labels: jax.Array,
    table_row: jax.Array,
    positions: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """Gathers and preprocesses one batch from the device-resident dataset.

  Args:
    images: uint8 `[N, H, W, C]`, the whole training set.
    labels: int `[N]`.
    table_row: int32 `[max_n]`, one client's row of `ClientTable.indices`.
    positions: int32 `[b]` from `batch_positions`.

  Returns:
    (x float32 `[b, H, W, C]` in [-1, 1], y int32 `[b]`).
  """
  example_idx = table_row[positions]
  x = preprocess(jnp.take(images, example_idx, axis=0))
  y = jnp.take(labels, example_idx, axis=0).astype(jnp.int32)
  return x, y
