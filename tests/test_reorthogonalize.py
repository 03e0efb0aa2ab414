"""Server re-orthogonalization (ALGORITHM.md 2.1), the normalized penalty and the score gap."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softjax.federated import round as round_lib
from softjax.federated import types as fl_types
from softjax.models import lora as lora_lib
from softjax.sparsify import diagnostics, soft
from softjax.sparsify import reorthogonalize as reorth
from softjax.sparsify import sparsifier as sparsifiers
from tests import support

D_OUT, D_IN, R = 12, 10, 4


def factors(seed=0, b_scale=1.0):
  rng = np.random.default_rng(seed)
  B = jnp.asarray(b_scale * rng.normal(size=(D_OUT, R)), jnp.float32)
  A = jnp.asarray(rng.normal(size=(R, D_IN)) / np.sqrt(D_IN), jnp.float32)
  return B, A


def test_the_product_is_kept_and_the_factors_become_orthogonal():
  B, A = factors()
  new_b, new_a, basis = reorth.reorthogonalize_layer(B, A)
  chex.assert_shape((new_b, new_a), ((D_OUT, R), (R, D_IN)))
  np.testing.assert_allclose(new_b @ new_a, B @ A, atol=1e-5)
  np.testing.assert_allclose(new_a @ new_a.T, np.eye(R), atol=1e-5)
  sigma = np.linalg.svd(np.asarray(B @ A, np.float64), compute_uv=False)[:R]
  gram_b = np.asarray(new_b.T @ new_b)
  np.testing.assert_allclose(gram_b, np.diag(sigma ** 2), atol=1e-4 * sigma[0] ** 2)
  # The norm-product score of each component is now exactly its singular value, in order.
  np.testing.assert_allclose(soft.component_scores(new_b, new_a), sigma, rtol=1e-5)
  # The reported basis is the one applied: A' = H A, B' = B H^-1, H H^-1 = I.
  np.testing.assert_allclose(basis.H @ A, new_a, atol=1e-5)
  np.testing.assert_allclose(B @ basis.H_inv, new_b, atol=1e-5)
  np.testing.assert_allclose(basis.H @ basis.H_inv, np.eye(R), atol=1e-5)


def test_a_zero_b_keeps_a_alive():
  """LoRA starts at B = 0: the singular values (all 0) stay on B, A stays orthonormal."""
  _, A = factors(1)
  new_b, new_a, basis = reorth.reorthogonalize_layer(jnp.zeros((D_OUT, R)), A)
  np.testing.assert_array_equal(new_b, 0.0)
  np.testing.assert_allclose(new_a @ new_a.T, np.eye(R), atol=1e-5)
  np.testing.assert_allclose(basis.H @ A, new_a, atol=1e-5)


def test_a_rank_deficient_a_keeps_its_factors():
  B, A = factors(2)
  A = A.at[1].set(0.0)  # no full row rank: H = V^T R_A^-T does not exist
  new_b, new_a, basis = reorth.reorthogonalize_layer(B, A)
  np.testing.assert_array_equal(new_b, B)
  np.testing.assert_array_equal(new_a, A)
  np.testing.assert_array_equal(basis.H, np.eye(R))


def test_residuals_move_with_the_basis_and_sent_plus_residual_is_kept():
  """Client k's update U = sent + E in the old basis maps to sent' + E' in the new one, with
  the client's virtual model (B + U_B, A + U_A) mapping to (B' + U_B', A' + U_A')."""
  B, A = factors(3)
  tree = {"layer": {"A": A, "B": B}}
  new_tree, bases = reorth.reorthogonalize(tree)
  rng = np.random.default_rng(4)
  n = 3
  u = {"layer": {"A": jnp.asarray(rng.normal(size=(n, R, D_IN)), jnp.float32),
                 "B": jnp.asarray(rng.normal(size=(n, D_OUT, R)), jnp.float32)}}
  mask = jnp.asarray([1.0, 0.0, 1.0, 0.0])  # SOFT keeps components 0 and 2
  sent = {"layer": {"A": u["layer"]["A"] * mask[:, None], "B": u["layer"]["B"] * mask}}
  resid = jax.tree.map(jnp.subtract, u, sent)
  moved_u = reorth.change_basis(u, bases)
  moved = jax.tree.map(jnp.add, reorth.change_basis(sent, bases),
                       reorth.change_basis(resid, bases))
  chex.assert_trees_all_close(moved, moved_u, atol=1e-5)
  for k in range(n):
    old_model = (B + u["layer"]["B"][k]) @ (A + u["layer"]["A"][k])
    new_model = ((new_tree["layer"]["B"] + moved_u["layer"]["B"][k])
                 @ (new_tree["layer"]["A"] + moved_u["layer"]["A"][k]))
    np.testing.assert_allclose(new_model, old_model, atol=1e-4)


def test_normalized_penalty_is_scale_free_and_zero_when_orthogonal():
  B, A = factors(5)
  for scale in (1e-2, 1.0, 1e3):  # eps matters only below ||B^T B||_F ~ 1e-6
    np.testing.assert_allclose(soft.layer_penalty(scale * B, A, "normalized"),
                               soft.layer_penalty(B, A, "normalized"), rtol=1e-4)
  new_b, new_a, _ = reorth.reorthogonalize_layer(B, A)
  assert float(soft.layer_penalty(new_b, new_a, "normalized")) < 1e-10
  # By hand: G = [[1, 1], [1, 1]] has offdiag^2 = 2 and ||G||^2 = 4.
  assert float(soft.normalized_offdiag(jnp.ones((2, 2)))) == pytest.approx(0.5)
  # At B = 0 the value and the gradient are finite (0).
  value, grad = jax.value_and_grad(lambda b: soft.layer_penalty(b, A, "normalized"))(
      jnp.zeros((D_OUT, R)))
  assert np.isfinite(float(value)) and np.all(np.isfinite(grad))


def test_score_gap_against_an_svd():
  B, A = factors(6)
  sigma = np.linalg.svd(np.asarray(B @ A, np.float64), compute_uv=False)[:R]
  np.testing.assert_allclose(diagnostics.product_singular_values(B, A), sigma, rtol=1e-5)
  scores = np.sort(np.asarray(soft.component_scores(B, A)))[::-1]
  want = np.linalg.norm(scores - sigma) / np.linalg.norm(sigma)
  assert float(diagnostics.score_gap(B, A)) == pytest.approx(want, rel=1e-4)
  assert want > 0.01  # random factors are not orthogonal
  new_b, new_a, _ = reorth.reorthogonalize_layer(B, A)
  assert float(diagnostics.score_gap(new_b, new_a)) < 1e-5
  assert float(diagnostics.score_gap(jnp.zeros((D_OUT, R)), A)) == 0.0


def test_a_round_with_reorthogonalization_keeps_every_product_and_residual():
  """Same round with and without the server step: equal B A per layer and head, orthogonal
  global factors, and each stored residual moved by the same basis (so every client's B + E_B,
  A + E_A product is unchanged)."""
  apply_fn, frozen, state, data = support.tiny_setup()
  method = sparsifiers.make_sparsifier("soft")
  st = fl_types.init_state(state.trainable.lora, state.trainable.head, 4, True)
  hp = fl_types.make_hparams(0.05, zeta=0.0, keep_ratio=0.5)
  out = {}
  for flag in (False, True):
    round_fn = jax.jit(round_lib.make_round(apply_fn, optimizer="sgd", local_steps=2,
                                            batch_size=4, client_parallelism=1,
                                            sparsifier=method, reorthogonalize=flag))
    out[flag] = round_fn(st, frozen, data, jnp.array([0, 2], jnp.int32), jax.random.key(0), hp)
  plain, turned = out[False][0], out[True][0]
  chex.assert_trees_all_close(plain.trainable.head, turned.trainable.head)
  _, bases = reorth.reorthogonalize(plain.trainable.lora)
  chex.assert_trees_all_close(reorth.change_basis(plain.residuals, bases), turned.residuals,
                              atol=1e-5)
  pairs = zip(lora_lib.factor_pairs(plain.trainable.lora)[0],
              lora_lib.factor_pairs(turned.trainable.lora)[0],
              lora_lib.factor_pairs(plain.residuals)[0], lora_lib.factor_pairs(turned.residuals)[0])
  for p, q, e, f in pairs:
    np.testing.assert_allclose(q["B"] @ q["A"], p["B"] @ p["A"], atol=1e-5)
    for k in (0, 2):
      np.testing.assert_allclose((q["B"] + f["B"][k]) @ (q["A"] + f["A"][k]),
                                 (p["B"] + e["B"][k]) @ (p["A"] + e["A"][k]), atol=1e-4)
  rb, ra = np.asarray(out[True][1].orth_residual)
  assert rb < 1e-3 and ra < 1e-3
  assert np.asarray(out[False][1].orth_residual)[1] > 0.05
  for _, metrics in out.values():
    assert 0 < float(metrics.score_gap) < 1 and float(metrics.score_energy) > 0


def test_reorthogonalization_is_refused_for_products():
  apply_fn, *_ = support.tiny_setup()
  with pytest.raises(ValueError, match="reorthogonalize needs factor uploads; slora"):
    round_lib.make_phases(apply_fn, optimizer="sgd", local_steps=1, batch_size=2,
                          client_parallelism=1, sparsifier=sparsifiers.make_sparsifier("slora"),
                          reorthogonalize=True)
