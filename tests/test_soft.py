"""SOFT against hand computations: penalty and gradient, scores vs SVD, counts, masks, error
feedback, and the section-3 diagnostics (ALGORITHM.md sections 2.1-2.4 and 3)."""

from fractions import Fraction
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from softjax.sparsify import diagnostics, soft
from softjax.sparsify import masks as masks_lib

# Two-component example. Columns of B: b1 = (1, 0, 0), b2 = (1, 1, 0), b1.b2 = 1,
# |b1|^2 = 1, |b2|^2 = 2. Rows of A: a1 = (1, 0, 1), a2 = (0, 1, 1), a1.a2 = 1, |a|^2 = 2.
B_HAND = np.array([[1., 1.], [0., 1.], [0., 0.]], np.float32)
A_HAND = np.array([[1., 0., 1.], [0., 1., 1.]], np.float32)


def orthogonal_factors(rng, d_out, d_in, b, a):
  """B = U diag(b), A = diag(a) V^T with orthonormal U, V (from QR)."""
  r = len(b)
  U, _ = np.linalg.qr(rng.normal(size=(d_out, r)))
  V, _ = np.linalg.qr(rng.normal(size=(d_in, r)))
  return (jnp.asarray(U * np.asarray(b)[None, :], jnp.float32),
          jnp.asarray(np.asarray(a)[:, None] * V.T, jnp.float32))


def hand_tree():
  """A LoRA tree with the hand example and a second, exactly orthogonal layer."""
  rng = np.random.default_rng(0)
  B2, A2 = orthogonal_factors(rng, 5, 4, [2., 1., .5], [1., 3., .2])
  return {"blk_0": {"query": {"A": jnp.asarray(A_HAND), "B": jnp.asarray(B_HAND)}},
          "blk_1": {"value": {"A": A2, "B": B2}}}


# ----------------------------------------------------------------------------------------------
# 2.1 penalty
# ----------------------------------------------------------------------------------------------

def test_offdiag_penalty_and_gradient_by_hand():
  tree = hand_tree()
  # R = 2 (b1.b2)^2 + 2 (a1.a2)^2 = 2 + 2; the orthogonal layer adds 0.
  value, grad = jax.value_and_grad(soft.orthogonality_penalty)(tree)
  np.testing.assert_allclose(value, 4.0, rtol=1e-6)
  # dR/dB = 4 B offdiag(B^T B): column 1 = 4 (b1.b2) b2, column 2 = 4 (b1.b2) b1.
  np.testing.assert_allclose(grad["blk_0"]["query"]["B"], [[4., 4.], [4., 0.], [0., 0.]],
                             atol=1e-5)
  # dR/dA = 4 offdiag(A A^T) A: row 1 = 4 (a1.a2) a2, row 2 = 4 (a1.a2) a1.
  np.testing.assert_allclose(grad["blk_0"]["query"]["A"], [[0., 4., 4.], [4., 0., 4.]],
                             atol=1e-5)
  np.testing.assert_allclose(grad["blk_1"]["value"]["B"], 0.0, atol=1e-5)
  np.testing.assert_allclose(grad["blk_1"]["value"]["A"], 0.0, atol=1e-5)


def test_identity_penalty_and_gradient_by_hand():
  B, A = jnp.asarray(B_HAND), jnp.asarray(A_HAND)
  # ||B^T B - I||^2 = (1-1)^2 + (2-1)^2 + 2 * 1^2 = 3; ||A A^T - I||^2 = 1 + 1 + 2 = 4.
  tree = {"q": {"A": A, "B": B}}
  value, grad = jax.value_and_grad(
      lambda t: soft.orthogonality_penalty(t, kind="identity"))(tree)
  np.testing.assert_allclose(value, 7.0, rtol=1e-6)
  # dR/dB = 4 B (B^T B - I) = 4 [b1, b2] [[0, 1], [1, 1]] = [4 b2, 4 b1 + 4 b2].
  np.testing.assert_allclose(grad["q"]["B"], [[4., 8.], [4., 4.], [0., 0.]], atol=1e-5)
  # dR/dA = 4 (A A^T - I) A = 4 [[1, 1], [1, 1]] A: both rows 4 (a1 + a2) = (4, 4, 8).
  np.testing.assert_allclose(grad["q"]["A"], [[4., 4., 8.], [4., 4., 8.]], atol=1e-5)


def test_penalty_zero_for_orthogonal_factors_and_empty_tree():
  rng = np.random.default_rng(1)
  B, A = orthogonal_factors(rng, 8, 6, [3., 2., 1., .1], [.5, 4., 1., 2.])
  assert float(soft.orthogonality_penalty({"l": {"A": A, "B": B}})) < 1e-9
  assert float(soft.orthogonality_penalty({})) == 0.0
  np.testing.assert_allclose(soft.offdiag_sq(jnp.array([[5., 1.], [2., 7.]])), 5.0)
  with pytest.raises(ValueError):
    soft.orthogonality_penalty({"l": {"A": A, "B": B}}, kind="bogus")


# ----------------------------------------------------------------------------------------------
# 2.2 scores
# ----------------------------------------------------------------------------------------------

def test_scores_equal_singular_values_for_orthogonal_factors():
  rng = np.random.default_rng(2)
  b, a = [3., .5, 2., 1.], [1., 4., .25, 2.]
  B, A = orthogonal_factors(rng, 10, 7, b, a)
  scores = soft.component_scores(B, A)
  np.testing.assert_allclose(scores, np.array(b) * np.array(a), rtol=1e-5)
  sv = np.linalg.svd(np.asarray(B) @ np.asarray(A), compute_uv=False)[:4]
  np.testing.assert_allclose(np.sort(scores)[::-1], sv, rtol=1e-5, atol=1e-5)


def test_update_scores_by_hand():
  B, A = jnp.asarray(B_HAND), jnp.asarray(A_HAND)
  dB, dA = 2.0 * B, jnp.zeros_like(A)
  # ||dB_i|| ||A_i|| = 2 |b_i| |a_i| = 2 * (1, sqrt 2) * sqrt 2.
  np.testing.assert_allclose(soft.update_scores(B, A, dB, dA),
                             [2 * math.sqrt(2), 4.0], rtol=1e-6)


@jax.jit
def _fit(zeta, target, params):
  """Minimises ||B A - target||^2 + zeta R(B, A) with Adam; zeta is traced (one compile)."""
  opt = optax.adam(0.02)

  def loss(p):
    fit = jnp.sum(jnp.square(p["B"] @ p["A"] - target))
    return fit + zeta * soft.orthogonality_penalty({"l": p})

  def step(carry, _):
    p, state = carry
    updates, state = opt.update(jax.grad(loss)(p), state, p)
    return (optax.apply_updates(p, updates), state), None

  (p, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=400)
  return p


def test_score_svd_gap_shrinks_with_zeta():
  rng = np.random.default_rng(0)
  d, r = 12, 4
  target = jnp.asarray(rng.normal(size=(d, r)) @ rng.normal(size=(r, d)) / 2, jnp.float32)
  init = {"B": jnp.asarray(rng.normal(size=(d, r)) * 0.5, jnp.float32),
          "A": jnp.asarray(rng.normal(size=(r, d)) * 0.5, jnp.float32)}
  gaps = {}
  for zeta in (0.0, 0.1, 1.0):
    p = _fit(jnp.float32(zeta), target, init)
    scores = np.sort(np.asarray(soft.component_scores(p["B"], p["A"])))[::-1]
    sv = np.linalg.svd(np.asarray(p["B"] @ p["A"]), compute_uv=False)[:r]
    gaps[zeta] = float(np.linalg.norm(scores - sv) / np.linalg.norm(sv))
  print("score/SVD gap by zeta:", gaps)
  assert gaps[0.0] > gaps[0.1] > gaps[1.0]
  assert gaps[1.0] < 0.05


# ----------------------------------------------------------------------------------------------
# 2.3 counts and masks
# ----------------------------------------------------------------------------------------------

def _ratio_grid():
  grid = {Fraction(j, n) for n in (3, 7, 8, 10, 16, 100) for j in range(1, n + 1)}
  return sorted(grid)


def test_kept_count_matches_exact_fractions_without_retracing():
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def count_and_mask(ratio, scores):
    m = masks_lib.kept_count(ratio, scores.shape[0])
    return m, masks_lib.topm_mask(scores, m)

  for r in (1, 3, 4, 8, 48):
    scores = jnp.asarray(np.random.default_rng(r).normal(size=r), jnp.float32)
    chex.clear_trace_counter()
    for frac in _ratio_grid():
      expected = max(1, math.ceil(frac * r))
      m, mask = count_and_mask(jnp.float32(float(frac)), scores)
      assert int(m) == expected, (frac, r, int(m))
      assert int(mask.sum()) == expected
      # The kept entries are the `expected` largest scores.
      best = np.argsort(-np.asarray(scores), kind="stable")[:expected]
      assert set(np.flatnonzero(np.asarray(mask))) == set(best)


def test_kept_count_exact_integers():
  assert int(masks_lib.kept_count(0.5, 8)) == 4
  assert int(masks_lib.kept_count(0.3, 10)) == 3
  assert int(masks_lib.kept_count(0.25, 4)) == 1
  assert int(masks_lib.kept_count(1e-4, 8)) == 1
  assert int(masks_lib.kept_count(1.0, 64)) == 64
  for m in range(1, 65):
    assert int(masks_lib.kept_count(m / 64, 64)) == m
    assert int(masks_lib.kept_count(m / 48, 48)) == min(m, 48)


def test_topm_mask_ties_go_to_lower_index():
  mask = masks_lib.topm_mask(jnp.array([1., 3., 3., 0., 3.]), 2)
  np.testing.assert_array_equal(mask, [0., 1., 1., 0., 0.])
  np.testing.assert_array_equal(masks_lib.topm_mask(jnp.zeros(4), 3), [1., 1., 1., 0.])


def test_global_topm_masks_pick_global_best():
  s1 = jnp.array([9., 1., 8., 0.])
  s2 = jnp.array([7., 6., 5., 10.])
  masks = masks_lib.global_topm_masks([s1, s2], 4)  # m = 2 per layer, L = 2
  np.testing.assert_array_equal(masks[0], [1., 0., 1., 0.])
  np.testing.assert_array_equal(masks[1], [1., 0., 0., 1.])
  assert sum(float(m.sum()) for m in masks) == 4


def test_apply_component_mask_keeps_columns_and_rows():
  UB = jnp.arange(6.).reshape(2, 3) + 1
  UA = jnp.arange(12.).reshape(3, 4) + 1
  sB, sA = soft.apply_component_mask(UB, UA, jnp.array([1., 0., 1.]))
  np.testing.assert_array_equal(sB, [[1., 0., 3.], [4., 0., 6.]])
  np.testing.assert_array_equal(sA[1], 0.0)
  np.testing.assert_array_equal(np.asarray(sA)[[0, 2]], np.asarray(UA)[[0, 2]])


# ----------------------------------------------------------------------------------------------
# 2.4 error feedback
# ----------------------------------------------------------------------------------------------

def _random_lora(rng, dims, r):
  return {f"blk_{i}": {"query": {"A": jnp.asarray(rng.normal(size=(r, d_in)), jnp.float32),
                                 "B": jnp.asarray(rng.normal(size=(d_out, r)), jnp.float32)}}
          for i, (d_in, d_out) in enumerate(dims)}


@pytest.mark.parametrize("selection", ["per_layer", "global"])
@pytest.mark.parametrize("score", ["factors", "update"])
def test_soft_error_feedback_invariant(selection, score):
  rng = np.random.default_rng(3)
  dims, r = [(6, 5), (4, 7), (3, 3)], 4
  g, loc, res = (_random_lora(rng, dims, r) for _ in range(3))
  compress = jax.jit(soft.soft_compress, static_argnames=("selection", "score"))
  sent, new_res, masks, dropped = compress(g, loc, res, jnp.float32(0.5),
                                           selection=selection, score=score)
  expected = jax.tree.map(lambda l, gg, e: l - gg + e, loc, g, res)
  chex.assert_trees_all_close(jax.tree.map(jnp.add, sent, new_res), expected, atol=1e-6)
  assert len(masks) == 3
  kept = [int(m.sum()) for m in masks]
  if selection == "per_layer":
    assert kept == [2, 2, 2]
  else:
    assert sum(kept) == 6
  # Sent components are whole (column of B and row of A together), the rest is residual.
  for (_, pair), (_, rpair), mask in zip(
      sorted(sent.items()), sorted(new_res.items()), masks):
    m = np.asarray(mask).astype(bool)
    assert np.all(np.asarray(pair["query"]["B"])[:, ~m] == 0)
    assert np.all(np.asarray(pair["query"]["A"])[~m] == 0)
    assert np.all(np.asarray(rpair["query"]["B"])[:, m] == 0)
  assert float(dropped) > 0


def test_soft_compress_layer_scores_and_dropped_energy_by_hand():
  # Global zero, no residual: U = local; "factors" scores = norm products of local factors.
  B_loc = jnp.array([[3., 0., 0.], [0., 1., 0.]])  # column norms 3, 1, 0
  A_loc = jnp.array([[1., 0.], [0., 2.], [5., 0.]])  # row norms 1, 2, 5 -> s = 3, 2, 0
  z_B, z_A = jnp.zeros_like(B_loc), jnp.zeros_like(A_loc)
  sB, sA, eB, eA, mask, dropped = soft.soft_compress_layer(z_B, z_A, B_loc, A_loc, z_B, z_A, 2)
  np.testing.assert_array_equal(mask, [1., 1., 0.])
  np.testing.assert_allclose(dropped, 0.0)
  np.testing.assert_array_equal(eA, [[0., 0.], [0., 0.], [5., 0.]])
  *_, mask1, dropped1 = soft.soft_compress_layer(z_B, z_A, B_loc, A_loc, z_B, z_A, 1)
  np.testing.assert_array_equal(mask1, [1., 0., 0.])
  np.testing.assert_allclose(dropped1, 4.0)  # 2^2 + 0^2


def test_soft_compress_empty_tree():
  sent, res, masks, dropped = soft.soft_compress({}, {}, {}, 0.5)
  assert sent == {} and res == {} and masks == [] and float(dropped) == 0.0


# ----------------------------------------------------------------------------------------------
# 3. diagnostics
# ----------------------------------------------------------------------------------------------

def test_covariance_term_matches_explicit_product():
  rng = np.random.default_rng(4)
  K, d_out, d_in, r = 3, 6, 5, 2
  Bs = rng.normal(size=(K, d_out, r)).astype(np.float32)
  As = rng.normal(size=(K, r, d_in)).astype(np.float32)
  p = np.array([0.5, 0.3, 0.2], np.float32)
  Bbar, Abar = np.einsum("k,kor->or", p, Bs), np.einsum("k,kri->ri", p, As)
  explicit = np.linalg.norm(np.einsum("k,kor,kri->oi", p, Bs, As) - Bbar @ Abar)
  got = diagnostics.covariance_term(jnp.asarray(Bs), jnp.asarray(As), jnp.asarray(p))
  np.testing.assert_allclose(got, explicit, rtol=1e-4)
  # Unnormalised weights give the same (they are normalised inside).
  np.testing.assert_allclose(diagnostics.covariance_term(Bs, As, 10 * p), explicit, rtol=1e-4)
  same = diagnostics.covariance_term(jnp.asarray(np.repeat(Bs[:1], K, 0)),
                              jnp.asarray(np.repeat(As[:1], K, 0)), jnp.asarray(p))
  assert float(same) == 0.0
  stacked = {"l0": {"A": jnp.asarray(As), "B": jnp.asarray(Bs)}}
  np.testing.assert_allclose(diagnostics.covariance_terms(stacked, jnp.asarray(p)), [explicit],
                             rtol=1e-4)


def test_orthogonality_residual():
  rng = np.random.default_rng(5)
  B, A = orthogonal_factors(rng, 7, 5, [1., 2., 3.], [3., 1., .5])
  rB, rA = diagnostics.orthogonality_residual(B, A)
  assert float(rB) < 1e-6 and float(rA) < 1e-6
  rB, rA = diagnostics.orthogonality_residual(jnp.asarray(B_HAND), jnp.asarray(A_HAND))
  # B^T B = [[1, 1], [1, 2]]: sqrt(2) / sqrt(7). A A^T = [[2, 1], [1, 2]]: sqrt(2) / sqrt(10).
  np.testing.assert_allclose(rB, math.sqrt(2 / 7), rtol=1e-6)
  np.testing.assert_allclose(rA, math.sqrt(2 / 10), rtol=1e-6)
  zero = diagnostics.orthogonality_residual(jnp.zeros((4, 2)), jnp.asarray(A_HAND[:, :3]))
  assert float(zero[0]) == 0.0
  rBs, rAs = diagnostics.orthogonality_residuals(hand_tree())
  assert rBs.shape == (2,) and float(rBs[0]) > 0 and float(rBs[1]) < 1e-6


def test_soft_compress_new_ratio_never_retraces_and_vmaps_over_clients():
  rng = np.random.default_rng(6)
  dims, r, K = [(6, 5), (4, 7)], 8, 3
  g = _random_lora(rng, dims, r)
  locs = jax.tree.map(lambda *x: jnp.stack(x), *[_random_lora(rng, dims, r) for _ in range(K)])
  res = jax.tree.map(jnp.zeros_like, locs)
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def clients(ratio, locs, res):
    return jax.vmap(lambda l, e: soft.soft_compress(g, l, e, ratio))(locs, res)

  for ratio, m in ((0.125, 1), (0.5, 4), (0.3, 3), (1.0, 8)):
    _, _, masks, dropped = clients(jnp.float32(ratio), locs, res)
    assert dropped.shape == (K,)
    for mask in masks:
      np.testing.assert_array_equal(mask.sum(-1), m)


@pytest.mark.parametrize("kind", soft.PENALTY_KINDS)
def test_penalty_gradient_finite_at_lora_init(kind):
  tree = {"q": {"A": jnp.asarray(A_HAND), "B": jnp.zeros((3, 2))}}
  grad = jax.grad(lambda t: soft.orthogonality_penalty(t, kind))(tree)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(grad))
