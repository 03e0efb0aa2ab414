"""Selection masks with traced counts: top-m components, top-k / random-k entries.

Counts come from traced keep ratios, so a new O never changes a shape or recompiles: every
selection is a 0/1 mask of the full shape.

References: ALGORITHM.md sections 2.3 (m = max(1, ceil(O r))) and 7 (TLoRA, RLoRA).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Products like O * r are compared with an integer after float32 rounding. Both O and the
# product carry at most one rounding each (relative 2^-24), so anything within a few float32
# epsilons (relative) of an integer is that integer: O = 0.5, r = 8 gives exactly 4, while
# O = 0.3 (stored as 0.30000001) with r = 10 gives 3, not 4.
_COUNT_REL_TOL = 8.0 * float(np.finfo(np.float32).eps)


def kept_count(keep_ratio: jax.Array | float, rank: int) -> jax.Array:
  """Components kept per layer: m = max(1, ceil(O * r)), clipped to r.

  A product O * r that is mathematically an integer gives exactly that integer despite float32
  rounding (values within a few float32 epsilons, relative, of an integer are snapped to it).

  Args:
    keep_ratio: O in (0, 1], traced float32 scalar (or a Python float).
    rank: r (or any item count), static.

  Returns:
    int32 scalar in [1, rank].

  References: ALGORITHM.md section 2.3.
  """
  x = jnp.asarray(keep_ratio, jnp.float32) * jnp.float32(rank)
  nearest = jnp.round(x)
  snapped = jnp.abs(x - nearest) <= _COUNT_REL_TOL * jnp.maximum(x, 1.0)
  count = jnp.where(snapped, nearest, jnp.ceil(x))
  return jnp.clip(count, 1, rank).astype(jnp.int32)


def topm_mask(scores: jax.Array, m: jax.Array | int) -> jax.Array:
  """Mask with exactly m ones at the highest scores; ties go to the lower index.

  Args:
    scores: [n] float scores.
    m: traced int scalar count (values outside [0, n] are clipped by the comparison).

  Returns:
    float32 [n] with exactly min(max(m, 0), n) ones.

  References: ALGORITHM.md section 2.3.
  """
  n = scores.shape[0]
  # A stable sort of the negated scores puts equal scores in index order; the inverse
  # permutation is each entry's rank, and comparing ranks with m needs no dynamic shape.
  order = jnp.argsort(-scores, stable=True)
  rank = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
  return (rank < m).astype(jnp.float32)


def global_topm_masks(score_list: Sequence[jax.Array], m_total: jax.Array | int
                      ) -> list[jax.Array]:
  """Global top-m_total selection across layers (the alternative to per-layer selection).

  Args:
    score_list: per-layer scores, [r_l] each.
    m_total: traced int scalar, total components kept over all layers (m * L).

  Returns:
    Per-layer float32 masks [r_l], with m_total ones in total at the globally best scores
    (ties go to the earlier layer, then the lower index).

  References: ALGORITHM.md section 2.3 (alternative switch).
  """
  if not score_list:
    return []
  sizes = [s.shape[0] for s in score_list]
  mask = topm_mask(jnp.concatenate(list(score_list)), m_total)
  return list(jnp.split(mask, np.cumsum(sizes)[:-1]))


def topk_count(keep_ratio: jax.Array | float, size: int) -> jax.Array:
  """Entries kept out of `size`: k = max(1, ceil(O * size)), clipped to size.

  Uses the same float32 guard as `kept_count`: a product that is mathematically an
  integer gives exactly that integer.

  Args:
    keep_ratio: O in (0, 1], traced float32 scalar.
    size: number of entries (static).

  Returns:
    int32 scalar in [1, size].

  References: ALGORITHM.md section 7 (TLoRA, RLoRA keep ratio).
  """
  return kept_count(keep_ratio, size)


def magnitude_topk_mask(x: jax.Array, k: jax.Array | int) -> jax.Array:
  """TLoRA mask: exactly k entries of largest |x|; ties go to the lower flat index.

  Args:
    x: array of any static shape.
    k: traced int scalar.

  Returns:
    float32 mask of x.shape.

  References: ALGORITHM.md section 7 (TLoRA).
  """
  return topm_mask(jnp.abs(x).reshape(-1), k).reshape(x.shape)


def random_k_mask(key: jax.Array, shape: tuple[int, ...], k: jax.Array | int) -> jax.Array:
  """RLoRA mask: exactly k entries chosen uniformly at random.

  The ranks of iid uniform draws form a uniformly random permutation, so the k best draws are a
  uniformly random k-subset. The mask depends only on (key, shape, k): a server holding the
  same key rebuilds it exactly, so no indices are sent. Use a different key (e.g. via
  `jax.random.fold_in`) for B and for A.

  Args:
    key: PRNG key shared with the server.
    shape: static mask shape.
    k: traced int scalar.

  Returns:
    float32 mask of `shape`.

  References: ALGORITHM.md section 7 (RLoRA).
  """
  size = 1
  for n in shape:
    size *= n
  draws = jax.random.uniform(key, (size,), jnp.float32)
  return topm_mask(draws, k).reshape(shape)
