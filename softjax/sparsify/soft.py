"""SOFT: orthogonality penalty, SVD-free component scores, top-m masks, error feedback.

Every function is pure and jittable with static shapes. The quantities the server chooses per
round (keep ratio O, kept count m, the penalty weight zeta at the call site) are traced scalars:
nothing here branches on their values in Python or slices with them, selections are 0/1 masks,
so a new value never recompiles.

LoRA trees follow `softjax.models.lora`: every adapted layer is a dict `{"A": [r, d_in],
"B": [d_out, r]}` and rank component i is (column i of B, row i of A). Tree-level functions list
layers in `jax.tree` flattening order, the order of `softjax.models.lora.lora_layers`.

References: ALGORITHM.md sections 2.1-2.4 (client side) and 3 (diagnostics).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from softjax.config.choices import PENALTY_KINDS, SCORE_KINDS, SELECTIONS  # noqa: F401  (re-exported)
from softjax.models.lora import factor_pairs
from softjax.sparsify.masks import global_topm_masks, kept_count, topm_mask

PyTree = Any


def _gram_cols(x: jax.Array) -> jax.Array:
  """x^T x, the [r, r] Gram matrix of the columns of x."""
  return x.T @ x


def _gram_rows(x: jax.Array) -> jax.Array:
  """x x^T, the [r, r] Gram matrix of the rows of x."""
  return x @ x.T


def _safe_ratio(num: jax.Array, den: jax.Array) -> jax.Array:
  """num / den, and 0 where den == 0 (with finite gradients on both branches)."""
  ok = den > 0
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def offdiag_sq(G: jax.Array) -> jax.Array:
  """Squared Frobenius norm of a square matrix without its diagonal.

  Args:
    G: [r, r] matrix.

  Returns:
    float32 scalar sum_{i != j} G_ij^2.

  References: ALGORITHM.md section 2.1.
  """
  # Zeroing the diagonal first (rather than ||G||^2 - ||diag G||^2) avoids cancellation when
  # the factors are nearly orthogonal and the diagonal dominates.
  off = jnp.where(jnp.eye(G.shape[0], dtype=bool), 0.0, G)
  return jnp.sum(jnp.square(off))


# eps of the normalized penalty, in units of ||G||_F^2: it keeps the ratio and its gradient
# finite at B = 0 (the LoRA initialization), where ||B^T B||^2 is exactly 0. Below
# ||G||_F ~ 1e-6 the penalty turns quartic again, which bounds its gradient (a degree-0
# function's gradient grows as 1 / scale) while B is still tiny.
NORMALIZED_EPS = 1e-12


def normalized_offdiag(G: jax.Array) -> jax.Array:
  """||offdiag(G)||_F^2 / (||G||_F^2 + eps), in [0, 1): 0 for a diagonal G.

  References: ALGORITHM.md section 2.1 (normalized penalty).
  """
  return offdiag_sq(G) / (jnp.sum(jnp.square(G)) + NORMALIZED_EPS)


def layer_penalty(B: jax.Array, A: jax.Array, kind: str = "offdiag") -> jax.Array:
  """Orthogonality penalty of one layer.

  Args:
    B: [d_out, r] up factor.
    A: [r, d_in] down factor.
    kind: "offdiag" (default [choice]): ||offdiag(B^T B)||^2 + ||offdiag(A A^T)||^2;
      "identity" (AdaLoRA-style): ||B^T B - I||^2 + ||A A^T - I||^2;
      "normalized": ||offdiag(G)||^2 / (||G||^2 + eps) for G = B^T B and G = A A^T, of degree 0
      in each factor's scale (a small B is pulled as hard as a large one).

  Returns:
    float32 scalar.

  References: ALGORITHM.md section 2.1.
  """
  GB, GA = _gram_cols(B), _gram_rows(A)
  if kind == "offdiag":
    return offdiag_sq(GB) + offdiag_sq(GA)
  if kind == "identity":
    eye = jnp.eye(GB.shape[0], dtype=GB.dtype)
    return jnp.sum(jnp.square(GB - eye)) + jnp.sum(jnp.square(GA - eye))
  if kind == "normalized":
    return normalized_offdiag(GB) + normalized_offdiag(GA)
  raise ValueError(f"Unknown penalty kind {kind!r}; expected one of {PENALTY_KINDS}.")


def orthogonality_penalty(lora_tree: PyTree, kind: str = "offdiag") -> jax.Array:
  """Orthogonality regulariser R summed over every adapted layer.

  The default "offdiag" kind only pushes B^T B and A A^T towards diagonal matrices, leaving the
  column / row norms free: those norms are exactly what the importance scores (2.2) read, so
  they must be allowed to carry the singular values. The "identity" kind (AdaLoRA-style) also
  pulls every norm towards 1, which flattens the scores towards equal values and fights the
  task loss over the scale of B A (B starts at zero, so early on it drags norms up from 0);
  it is kept as a switch, not as the default.

  Args:
    lora_tree: LoRA tree (nested dicts ending in `{"A": [r, d_in], "B": [d_out, r]}`).
    kind: "offdiag", "normalized" or "identity", see `layer_penalty`.

  Returns:
    float32 scalar; 0.0 for a tree without layers.

  References: ALGORITHM.md section 2.1.
  """
  if kind not in PENALTY_KINDS:
    raise ValueError(f"Unknown penalty kind {kind!r}; expected one of {PENALTY_KINDS}.")
  pairs, _ = factor_pairs(lora_tree)
  total = jnp.zeros((), jnp.float32)
  for pair in pairs:
    total = total + layer_penalty(pair["B"], pair["A"], kind)
  return total


def component_scores(B: jax.Array, A: jax.Array) -> jax.Array:
  """Norm-product importance of every rank component.

  s_i = ||B[:, i]|| * ||A[i, :]||. When the columns of B and the rows of A are mutually
  orthogonal, B A = sum_i s_i u_i v_i^T is an SVD, so s are its singular values; otherwise they
  are an O(r (d_in + d_out)) proxy. No B A product and no SVD are formed.

  Args:
    B: [d_out, r].
    A: [r, d_in].

  Returns:
    float32 [r].

  References: ALGORITHM.md section 2.2.
  """
  return jnp.linalg.norm(B, axis=0) * jnp.linalg.norm(A, axis=1)


def update_scores(B: jax.Array, A: jax.Array, dB: jax.Array, dA: jax.Array) -> jax.Array:
  """Importance of the update of each component (the alternative scoring switch).

  s_i = ||dB[:, i]|| ||A[i, :]|| + ||B[:, i]|| ||dA[i, :]||, the first-order size of the change
  of component i's contribution B_i A_i.

  Args:
    B: [d_out, r] reference (global) up factor.
    A: [r, d_in] reference (global) down factor.
    dB: [d_out, r] update of B.
    dA: [r, d_in] update of A.

  Returns:
    float32 [r].

  References: ALGORITHM.md section 2.2 (alternative switch).
  """
  nB, nA = jnp.linalg.norm(B, axis=0), jnp.linalg.norm(A, axis=1)
  ndB, ndA = jnp.linalg.norm(dB, axis=0), jnp.linalg.norm(dA, axis=1)
  return ndB * nA + nB * ndA


def apply_component_mask(UB: jax.Array, UA: jax.Array, mask: jax.Array
                         ) -> tuple[jax.Array, jax.Array]:
  """Keeps column i of UB and row i of UA where mask_i = 1, zeros elsewhere.

  Args:
    UB: [d_out, r] update of B.
    UA: [r, d_in] update of A.
    mask: float32 [r] of 0/1.

  Returns:
    (sent_B [d_out, r], sent_A [r, d_in]).

  References: ALGORITHM.md section 2.3.
  """
  return UB * mask[None, :], UA * mask[:, None]


def error_feedback_split(U: PyTree, sent: PyTree) -> PyTree:
  """New error-feedback residual U - sent (arrays or matching pytrees).

  Invariant: sent + residual == U, i.e. nothing of the (residual-augmented) update is lost;
  what is not sent this round is carried to the next.

  Args:
    U: update including the old residual.
    sent: the part transmitted this round (a masked copy of U).

  Returns:
    The residual, same structure as U.

  References: ALGORITHM.md section 2.4.
  """
  return jax.tree.map(jnp.subtract, U, sent)


def _layer_update_and_scores(B_global, A_global, B_local, A_local, EB, EA, score):
  """U = local - global + residual for both factors, and the scores that rank U's components."""
  UB = B_local - B_global + EB
  UA = A_local - A_global + EA
  if score == "factors":
    # The client's factors plus its residual: what its model would be if U were applied.
    s = component_scores(B_global + UB, A_global + UA)
  elif score == "update":
    s = update_scores(B_global, A_global, UB, UA)
  else:
    raise ValueError(f"Unknown score kind {score!r}; expected one of {SCORE_KINDS}.")
  return UB, UA, s


def _finish_layer(UB, UA, s, mask):
  """Masked send, new residual and dropped score energy of one layer."""
  sent_B, sent_A = apply_component_mask(UB, UA, mask)
  new_EB, new_EA = error_feedback_split((UB, UA), (sent_B, sent_A))
  dropped = jnp.sum(jnp.square(s) * (1.0 - mask))
  return sent_B, sent_A, new_EB, new_EA, dropped


def soft_compress_layer(B_global: jax.Array, A_global: jax.Array, B_local: jax.Array,
                        A_local: jax.Array, EB: jax.Array, EA: jax.Array,
                        m: jax.Array | int, score: str = "factors"):
  """SOFT sparsification of one layer with error feedback.

  U = (B_local - B_global + EB, A_local - A_global + EA); the m best components of U by score
  are sent and the rest becomes the new residual.

  Args:
    B_global, A_global: the round's global factors, [d_out, r] and [r, d_in].
    B_local, A_local: the client's factors after local training.
    EB, EA: the client's error-feedback residuals (zeros when error feedback is off).
    m: traced int scalar, components to keep.
    score: "factors" (default [choice]): scores of (B_global + U_B, A_global + U_A), i.e. the
      client's factors plus its residual; "update": `update_scores(B_global, A_global, U_B,
      U_A)`. Static.

  Returns:
    (sent_B, sent_A, new_EB, new_EA, mask [r], dropped_energy), with sent + new residual == U
    and dropped_energy = sum of s_i^2 over the components not kept.

  References: ALGORITHM.md sections 2.2-2.4.
  """
  UB, UA, s = _layer_update_and_scores(B_global, A_global, B_local, A_local, EB, EA, score)
  mask = topm_mask(s, m)
  sent_B, sent_A, new_EB, new_EA, dropped = _finish_layer(UB, UA, s, mask)
  return sent_B, sent_A, new_EB, new_EA, mask, dropped


def soft_compress(global_lora: PyTree, local_lora: PyTree, residual_lora: PyTree,
                  keep_ratio: jax.Array | float, *, selection: str = "per_layer",
                  score: str = "factors"):
  """SOFT sparsification of a whole LoRA tree with error feedback.

  Per layer m = `kept_count(keep_ratio, r_l)`. With selection="per_layer" (default [choice])
  each layer keeps its own m best components; with selection="global" the sum of those counts
  (m * L for equal ranks) is picked across all layers by raw score.

  With error feedback off, the caller passes a zero `residual_lora` every round and ignores the
  returned residual tree.

  Args:
    global_lora: the round's global LoRA tree.
    local_lora: the client's trained LoRA tree (same structure).
    residual_lora: the client's residual tree (same structure; zeros at the start).
    keep_ratio: O in (0, 1], traced float32 scalar.
    selection: "per_layer" or "global". Static.
    score: "factors" or "update", see `soft_compress_layer`. Static.

  Returns:
    (sent_tree, new_residual_tree, masks, dropped_energy): the trees have the LoRA structure,
    masks is a list of float32 [r_l] in `jax.tree` layer order, dropped_energy a float32 scalar
    summed over layers.

  References: ALGORITHM.md sections 2.2-2.4.
  """
  if selection not in SELECTIONS:
    raise ValueError(f"Unknown selection {selection!r}; expected one of {SELECTIONS}.")
  g_pairs, treedef = factor_pairs(global_lora)
  l_pairs, l_def = factor_pairs(local_lora)
  e_pairs, e_def = factor_pairs(residual_lora)
  if l_def != treedef or e_def != treedef:
    raise ValueError("global, local and residual LoRA trees must have the same structure.")

  parts = [_layer_update_and_scores(g["B"], g["A"], l["B"], l["A"], e["B"], e["A"], score)
           for g, l, e in zip(g_pairs, l_pairs, e_pairs)]
  ranks = [g["A"].shape[0] for g in g_pairs]
  if selection == "per_layer":
    masks = [topm_mask(s, kept_count(keep_ratio, r)) for (_, _, s), r in zip(parts, ranks)]
  else:
    m_total = sum((kept_count(keep_ratio, r) for r in ranks), jnp.zeros((), jnp.int32))
    masks = global_topm_masks([s for _, _, s in parts], m_total)

  sent, resid = [], []
  dropped = jnp.zeros((), jnp.float32)
  for (UB, UA, s), mask in zip(parts, masks):
    sent_B, sent_A, new_EB, new_EA, d = _finish_layer(UB, UA, s, mask)
    sent.append({"A": sent_A, "B": sent_B})
    resid.append({"A": new_EA, "B": new_EB})
    dropped = dropped + d
  return (jax.tree.unflatten(treedef, sent), jax.tree.unflatten(treedef, resid), masks,
          dropped)
