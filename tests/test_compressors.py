"""Baseline compressors: TLoRA / RLoRA masks and error feedback, SLoRA SVD steps
(ALGORITHM.md section 7)."""

from fractions import Fraction
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softjax.sparsify import baselines
from softjax.sparsify import masks as masks_lib


def test_topk_count_matches_exact_fractions():
  count = jax.jit(masks_lib.topk_count, static_argnums=1)
  for size in (1, 12, 40, 6144):
    for n in (3, 8, 10, 100):
      for j in range(1, n + 1):
        frac = Fraction(j, n)
        assert int(count(jnp.float32(float(frac)), size)) == max(1, math.ceil(frac * size))


def test_magnitude_topk_mask_keeps_largest():
  x = jnp.array([[0.5, -3.0, 2.0], [-2.0, 0.0, 1.0]])
  mask = masks_lib.magnitude_topk_mask(x, 3)
  # |x| = 0.5 3 2 / 2 0 1: the two 2's tie, both are in the top 3 with the 3.
  np.testing.assert_array_equal(mask, [[0., 1., 1.], [1., 0., 0.]])
  mask2 = masks_lib.magnitude_topk_mask(x, 2)  # tie 2 vs 2: the lower flat index (2) wins
  np.testing.assert_array_equal(mask2, [[0., 1., 1.], [0., 0., 0.]])

  rng = np.random.default_rng(0)
  y = rng.normal(size=(7, 5)).astype(np.float32)
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def mask_fn(v, k):
    return masks_lib.magnitude_topk_mask(v, k)

  for k in range(1, y.size + 1):
    m = np.asarray(mask_fn(y, jnp.int32(k)))
    assert m.sum() == k
    assert np.abs(y[m == 1]).min() >= np.abs(y[m == 0]).max(initial=0.0)


def test_random_k_mask_reproducible_and_exact():
  key = jax.random.key(7)
  a = masks_lib.random_k_mask(key, (6, 4), 9)
  b = masks_lib.random_k_mask(key, (6, 4), 9)
  c = masks_lib.random_k_mask(jax.random.key(8), (6, 4), 9)
  np.testing.assert_array_equal(a, b)
  assert float(a.sum()) == 9 and float(c.sum()) == 9
  assert not np.array_equal(a, c)
  assert set(np.unique(np.asarray(a))) == {0.0, 1.0}
  # Roughly uniform: over many keys every entry is picked about k / size of the time.
  keys = jax.random.split(jax.random.key(0), 2000)
  freq = jax.vmap(lambda k: masks_lib.random_k_mask(k, (6, 4), 6))(keys).mean(0)
  np.testing.assert_allclose(freq, 0.25, atol=0.05)


@pytest.mark.parametrize("method", ["tlora", "rlora"])
def test_elementwise_error_feedback_invariant(method):
  rng = np.random.default_rng(1)
  U = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
  res = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
  if method == "tlora":
    fn = jax.jit(baselines.tlora_compress)
    sent, new_res = fn(U, res, jnp.float32(0.25))
  else:
    fn = jax.jit(baselines.rlora_compress)
    sent, new_res = fn(jax.random.key(3), U, res, jnp.float32(0.25))
  np.testing.assert_allclose(sent + new_res, U + res, atol=1e-6)
  assert int(jnp.sum(sent != 0)) == 5  # k = 0.25 * 20
  assert bool(jnp.all((sent == 0) | (new_res == 0)))


def test_rlora_rescale_switch():
  U = jnp.arange(1., 9.).reshape(2, 4)
  key = jax.random.key(0)
  sent, new_res = baselines.rlora_compress(key, U, jnp.zeros_like(U), 0.25, rescale=True)
  mask = masks_lib.random_k_mask(key, U.shape, 2)
  np.testing.assert_allclose(sent, U * mask * 4.0)  # 1 / O = 8 / 2
  np.testing.assert_array_equal(new_res, 0.0)  # error feedback off by convention


def test_svd_full_rank_reconstructs_and_masks_triplets():
  rng = np.random.default_rng(2)
  P = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
  U, s, Vt, mask = baselines.svd_topm(P, 4)
  assert U.shape == (6, 4) and s.shape == (4,) and Vt.shape == (4, 4)
  np.testing.assert_allclose(baselines.reconstruct(U, s, Vt, mask), P, atol=1e-5)
  U, s, Vt, mask = jax.jit(baselines.svd_topm)(P, jnp.int32(2))
  np.testing.assert_array_equal(mask, [1., 1., 0., 0.])
  u, sv, vt = np.linalg.svd(np.asarray(P), full_matrices=False)
  np.testing.assert_allclose(baselines.reconstruct(U, s, Vt, mask),
                             (u[:, :2] * sv[:2]) @ vt[:2], atol=1e-5)


@pytest.mark.parametrize("rank", [2, 3])
def test_refactorize_is_best_rank_r_with_orthogonal_factors(rank):
  rng = np.random.default_rng(3)
  P = rng.normal(size=(7, 5)).astype(np.float32)
  B, A = baselines.refactorize(jnp.asarray(P), rank)
  assert B.shape == (7, rank) and A.shape == (rank, 5)
  u, sv, vt = np.linalg.svd(P, full_matrices=False)
  best = (u[:, :rank] * sv[:rank]) @ vt[:rank]
  np.testing.assert_allclose(B @ A, best, atol=1e-5)
  # Columns of B and rows of A are orthogonal, each carrying sqrt(s_i) squared = s_i.
  np.testing.assert_allclose(B.T @ B, np.diag(sv[:rank]), atol=1e-5)
  np.testing.assert_allclose(A @ A.T, np.diag(sv[:rank]), atol=1e-5)


def test_refactorize_pads_when_rank_exceeds_dims():
  P = jnp.asarray(np.random.default_rng(4).normal(size=(3, 2)), jnp.float32)
  B, A = baselines.refactorize(P, 4)
  assert B.shape == (3, 4) and A.shape == (4, 2)
  np.testing.assert_allclose(B @ A, P, atol=1e-5)
  np.testing.assert_array_equal(B[:, 2:], 0.0)


def test_server_average_of_reconstructions_by_hand():
  # Two clients with one triplet each on orthogonal axes: P_1 = 2 e1 f1^T, P_2 = 3 e2 f2^T.
  # With p = (0.25, 0.75) the average is diag(0.5, 2.25) in the top-left corner.
  P1 = jnp.zeros((3, 2)).at[0, 0].set(2.0)
  P2 = jnp.zeros((3, 2)).at[1, 1].set(3.0)
  outs = [baselines.svd_topm(P, 1) for P in (P1, P2)]
  stacked = [jnp.stack(x) for x in zip(*outs)]
  p = jnp.array([0.25, 0.75])
  avg = baselines.aggregate_reconstructions(*stacked, p)
  np.testing.assert_allclose(avg, [[0.5, 0.], [0., 2.25], [0., 0.]], atol=1e-6)
  manual = sum(w * baselines.reconstruct(*o) for w, o in zip((0.25, 0.75), outs))
  np.testing.assert_allclose(avg, manual, atol=1e-6)
