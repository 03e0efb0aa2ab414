"""Server-side re-orthogonalization of the global LoRA factors, product kept exactly.

SOFT's scores ||B_i|| ||A_i|| are singular values of B A only when B's columns and A's rows are
orthogonal. After each aggregation the server can make that true without changing B A and
without forming it: per layer O((d_in + d_out) r^2) work on thin QR factors and an r x r SVD.

References: ALGORITHM.md section 2.1 (exact server re-orthogonalization).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from softjax.models.lora import factor_pairs
from softjax.sparsify import lapack

PyTree = Any


class Basis(NamedTuple):
  """The change of basis of one layer: A' = H A, B' = B H_inv (H_inv H = I)."""
  H: jax.Array  # [r, r]
  H_inv: jax.Array  # [r, r]


def product_svd(left: jax.Array, right: jax.Array):
  """The thin SVD of left @ right [m, n] without forming it: left = Q_L R_L and
  right^T = Q_R R_R (thin QR), then the j x j core R_L R_R^T = U S V^T, so that
  left @ right = (Q_L U) diag(S) (V^T Q_R^T). O((m + n) j^2) for an inner size j.

  Returns:
    (Q_L, U, S, V^T, Q_R, R_R).
  """
  q_l, r_l = lapack.qr(left)
  q_r, r_r = lapack.qr(right.T)
  u, s, vt = lapack.svd(jnp.matmul(r_l, r_r.T, precision=jax.lax.Precision.HIGHEST))
  return q_l, u, s, vt, q_r, r_r


def reorthogonalize_layer(B: jax.Array, A: jax.Array) -> tuple[jax.Array, jax.Array, Basis]:
  """(B', A', basis) with B'A' = BA, A' orthonormal rows, B' orthogonal columns of norms S.

  Thin QR B = Q_B R_B and A^T = Q_A R_A; SVD of the r x r core R_B R_A^T = U S V^T; then
  B' = Q_B U S and A' = V^T Q_A^T. The singular values stay on B, so a zero B (its LoRA
  initialization) leaves A' orthonormal instead of zeroing it. With H = V^T R_A^-T,
  A' = H A and B' = B H^-1, H^-1 = R_A^T V. That needs A of full row rank (its Gaussian
  initialization gives it); a layer where it fails (a non-finite H) keeps its factors and the
  identity basis.

  Args:
    B: [d_out, r], d_out >= r.
    A: [r, d_in], d_in >= r.

  Returns:
    (B' [d_out, r], A' [r, d_in], Basis). Components come out by descending singular value.

  References: ALGORITHM.md section 2.1.
  """
  hi = jax.lax.Precision.HIGHEST  # r x r and thin products: full precision costs little
  q_b, u, s, vt, q_a, r_a = product_svd(B, A)
  # H = V^T R_A^-T, i.e. H^T = R_A^-1 V: one triangular solve.
  h = lapack.solve_upper(r_a, vt.T).T
  h_inv = jnp.matmul(r_a.T, vt.T, precision=hi)
  new_b = jnp.matmul(q_b, u * s[None, :], precision=hi)
  new_a = jnp.matmul(vt, q_a.T, precision=hi)
  ok = jnp.all(jnp.isfinite(h)) & jnp.all(jnp.isfinite(new_b)) & jnp.all(jnp.isfinite(new_a))
  eye = jnp.eye(A.shape[0], dtype=A.dtype)
  return (jnp.where(ok, new_b, B), jnp.where(ok, new_a, A),
          Basis(H=jnp.where(ok, h, eye), H_inv=jnp.where(ok, h_inv, eye)))


def reorthogonalize(lora_tree: PyTree) -> tuple[PyTree, list[Basis]]:
  """`reorthogonalize_layer` on every layer: (new tree, bases in `jax.tree` layer order)."""
  pairs, treedef = factor_pairs(lora_tree)
  out, bases = [], []
  for pair in pairs:
    new_b, new_a, basis = reorthogonalize_layer(pair["B"], pair["A"])
    out.append({"A": new_a, "B": new_b})
    bases.append(basis)
  return jax.tree.unflatten(treedef, out), bases


def change_basis(tree: PyTree, bases: list[Basis]) -> PyTree:
  """Moves factor-shaped arrays into the new bases: X_A -> H X_A, X_B -> X_B H^-1.

  Applied to every client's error-feedback residual (leaves with any leading axes, e.g. the
  [N] store), so sent + residual stays the client's update expressed in the new basis: both
  maps are linear, hence (sent + E) maps to sent' + E' exactly.

  References: ALGORITHM.md section 2.1 (residuals move with the basis).
  """
  hi = jax.lax.Precision.HIGHEST
  pairs, treedef = factor_pairs(tree)
  out = [{"A": jnp.einsum("rs,...sd->...rd", basis.H, pair["A"], precision=hi),
          "B": jnp.einsum("...or,rs->...os", pair["B"], basis.H_inv, precision=hi)}
         for pair, basis in zip(pairs, bases)]
  return jax.tree.unflatten(treedef, out)
