"""Per-round diagnostics of separate B/A averaging and of orthogonality, without d x d products.

References: ALGORITHM.md section 3 (diagnostics logged per round).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from softjax.models.lora import factor_pairs
from softjax.sparsify import lapack
from softjax.sparsify.soft import (
  _gram_cols,
  _gram_rows,
  _safe_ratio,
  component_scores,
  offdiag_sq,
)

PyTree = Any


def covariance_term(Bs: jax.Array, As: jax.Array, p: jax.Array) -> jax.Array:
  """Covariance error of separate averaging, || sum_k p_k B_k A_k - Bbar Abar ||_F.

  Computed from r x r Gram matrices only; no d_out x d_in matrix is formed.

  Derivation. With weights normalised to sum_k p_k = 1, Bbar = sum_k p_k B_k,
  Abar = sum_k p_k A_k, and deviations D_k = B_k - Bbar, E_k = A_k - Abar (so that
  sum_k p_k D_k = 0 and sum_k p_k E_k = 0):
    sum_k p_k B_k A_k = sum_k p_k (Bbar + D_k)(Abar + E_k)
                      = Bbar Abar + Bbar (sum_k p_k E_k) + (sum_k p_k D_k) Abar
                        + sum_k p_k D_k E_k
                      = Bbar Abar + sum_k p_k D_k E_k.
  Hence the difference is X = sum_k p_k D_k E_k and
    ||X||_F^2 = sum_{k,j} p_k p_j tr((D_k E_k)^T D_j E_j)
              = sum_{k,j} p_k p_j tr((D_k^T D_j) (E_j E_k^T)),
  a sum over pairs of products of r x r Grams: O(K^2 r^2 (d_in + d_out)) work.

  Args:
    Bs: [K, d_out, r] client up factors.
    As: [K, r, d_in] client down factors.
    p: [K] non-negative aggregation weights (normalised here to sum to 1).

  Returns:
    float32 scalar >= 0.

  References: ALGORITHM.md section 3.
  """
  # Accelerators may run default float32 matmuls at reduced precision; these products are
  # only r x r (and K x K), so full precision costs nothing that matters.
  hi = jax.lax.Precision.HIGHEST
  w = p / jnp.sum(p)
  D = Bs - jnp.einsum("k,kor->or", w, Bs, precision=hi)
  E = As - jnp.einsum("k,kri->ri", w, As, precision=hi)
  GD = jnp.einsum("koi,jol->kjil", D, D, precision=hi)  # [k, j] -> D_k^T D_j
  GE = jnp.einsum("jlb,kib->jkli", E, E, precision=hi)  # [j, k] -> E_j E_k^T
  # tr(GD[k, j] @ GE[j, k]) = sum_{i,l} GD[k, j, i, l] GE[j, k, l, i]
  traces = jnp.einsum("kjil,jkli->kj", GD, GE, precision=hi)
  sq = jnp.einsum("k,j,kj->", w, w, traces, precision=hi)
  # The sum is a squared norm; round-off can leave it a hair below zero.
  return jnp.sqrt(jnp.maximum(sq, 0.0))


def covariance_terms(stacked_lora: PyTree, p: jax.Array) -> jax.Array:
  """`covariance_term` of every layer of a client-stacked LoRA tree.

  Args:
    stacked_lora: LoRA tree whose leaves carry a leading client axis K.
    p: [K] aggregation weights.

  Returns:
    float32 [L], in `jax.tree` layer order.

  References: ALGORITHM.md section 3.
  """
  pairs, _ = factor_pairs(stacked_lora)
  return jnp.stack([covariance_term(q["B"], q["A"], p) for q in pairs]) if pairs else (
      jnp.zeros((0,), jnp.float32))


def orthogonality_residual(B: jax.Array, A: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Relative non-orthogonality of one layer's factors.

  Args:
    B: [d_out, r].
    A: [r, d_in].

  Returns:
    (rB, rA) = (||offdiag(B^T B)||_F / ||B^T B||_F, ||offdiag(A A^T)||_F / ||A A^T||_F),
    each 0 when its denominator is 0 (e.g. B at its zero initialisation).

  References: ALGORITHM.md section 3.
  """
  def ratio(G):
    return _safe_ratio(jnp.sqrt(offdiag_sq(G)), jnp.sqrt(jnp.sum(jnp.square(G))))
  return ratio(_gram_cols(B)), ratio(_gram_rows(A))


def orthogonality_residuals(lora_tree: PyTree) -> tuple[jax.Array, jax.Array]:
  """`orthogonality_residual` of every layer.

  Args:
    lora_tree: LoRA tree.

  Returns:
    (rB [L], rA [L]) float32, in `jax.tree` layer order.

  References: ALGORITHM.md section 3.
  """
  pairs, _ = factor_pairs(lora_tree)
  if not pairs:
    return jnp.zeros((0,), jnp.float32), jnp.zeros((0,), jnp.float32)
  rs = [orthogonality_residual(q["B"], q["A"]) for q in pairs]
  return jnp.stack([r[0] for r in rs]), jnp.stack([r[1] for r in rs])


def product_singular_values(B: jax.Array, A: jax.Array) -> jax.Array:
  """The r singular values of B A, descending, from thin QR factors and an r x r SVD.

  B = Q_B R_B and A^T = Q_A R_A give B A = Q_B (R_B R_A^T) Q_A^T with orthonormal Q's, so B A
  and the core share their singular values: no d_out x d_in product is formed.

  References: ALGORITHM.md sections 2.1, 2.2.
  """
  _, r_b = lapack.qr(B)
  _, r_a = lapack.qr(A.T)
  return lapack.singular_values(jnp.matmul(r_b, r_a.T, precision=jax.lax.Precision.HIGHEST))


def score_gap(B: jax.Array, A: jax.Array) -> jax.Array:
  """||sort(s) - sigma|| / ||sigma|| for SOFT's scores s = ||B_i|| ||A_i|| and the singular
  values sigma of B A: 0 exactly when the scores are the singular values (orthogonal factors),
  0 for B A = 0.

  References: ALGORITHM.md section 2.2 (test obligation: the score-vs-SVD gap).
  """
  scores = jnp.sort(component_scores(B, A))[::-1]
  sigma = product_singular_values(B, A)
  return _safe_ratio(jnp.linalg.norm(scores - sigma), jnp.linalg.norm(sigma))


def score_diagnostics(lora_tree: PyTree) -> tuple[jax.Array, jax.Array]:
  """(mean score gap over layers, total score energy sum_l sum_i s_li^2) of one LoRA tree."""
  pairs, _ = factor_pairs(lora_tree)
  if not pairs:
    return jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
  gaps = jnp.stack([score_gap(q["B"], q["A"]) for q in pairs])
  energy = sum(jnp.sum(jnp.square(component_scores(q["B"], q["A"]))) for q in pairs)
  return gaps.mean(), energy
