"""Baseline compressors of a single matrix: TLoRA (top-k), RLoRA (random-k), SLoRA (SVD).

All functions are pure and jittable with static shapes. Counts derived from the server's keep
ratio are traced int32 scalars and selections are 0/1 masks, so a new ratio never recompiles.
Index-bit accounting lives on the host (`softjax.sparsify.payload`), not here.

References: ALGORITHM.md section 7.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from softjax.sparsify import lapack, soft
from softjax.sparsify.masks import magnitude_topk_mask, random_k_mask, topk_count

# mask_fn(values, k) -> float32 0/1 mask of values.shape with exactly k ones.
MaskFn = Callable[[jax.Array, jax.Array], jax.Array]


def elementwise_compress(U: jax.Array, residual: jax.Array, k: jax.Array | int,
                         mask_fn: MaskFn, *, rescale: bool = False
                         ) -> tuple[jax.Array, jax.Array]:
  """Element-wise sparsification of one matrix with error feedback.

  V = U + residual; mask = mask_fn(V, k); sent = V * mask; new residual = V - sent, so
  sent + new residual == U + residual. With error feedback off, pass a zero residual and ignore
  the returned one.

  With `rescale=True` (RLoRA's 1/O switch) sent = V * mask * size / k, an unbiased estimate of
  V for a uniformly random mask. Error feedback is then off by convention: the returned
  residual is zero, and the caller should pass a zero residual.

  Args:
    U: update (local - global) of one factor.
    residual: the client's residual of that factor (zeros when error feedback is off).
    k: traced int scalar, entries to keep.
    mask_fn: `mask_fn(V, k)`, e.g. `magnitude_topk_mask` or
      `lambda v, k: random_k_mask(key, v.shape, k)`.
    rescale: static; scale the sent entries by size / k.

  Returns:
    (sent, new_residual), both of U.shape.

  References: ALGORITHM.md sections 2.4 and 7 (TLoRA, RLoRA).
  """
  V = U + residual
  mask = mask_fn(V, k)
  sent = V * mask
  if rescale:
    scale = jnp.float32(V.size) / jnp.maximum(jnp.asarray(k, jnp.float32), 1.0)
    return sent * scale, jnp.zeros_like(V)
  return sent, soft.error_feedback_split(V, sent)


def tlora_compress(U: jax.Array, residual: jax.Array, keep_ratio: jax.Array | float
                   ) -> tuple[jax.Array, jax.Array]:
  """TLoRA on one factor: magnitude top-k of U + residual, k = topk_count(O, U.size).

  Args:
    U: update of one factor.
    residual: its error-feedback residual.
    keep_ratio: traced O.

  Returns:
    (sent, new_residual).

  References: ALGORITHM.md section 7 (TLoRA).
  """
  return elementwise_compress(U, residual, topk_count(keep_ratio, U.size), magnitude_topk_mask)


def rlora_compress(key: jax.Array, U: jax.Array, residual: jax.Array,
                   keep_ratio: jax.Array | float, *, rescale: bool = False
                   ) -> tuple[jax.Array, jax.Array]:
  """RLoRA on one factor: random-k of U + residual from a key shared with the server.

  Default [choice]: error feedback, no rescaling; `rescale=True` is the 1/O switch (EF off).

  Args:
    key: PRNG key shared with the server (distinct per factor, client and round).
    U: update of one factor.
    residual: its error-feedback residual (zeros with `rescale=True`).
    keep_ratio: traced O.
    rescale: static, see `elementwise_compress`.

  Returns:
    (sent, new_residual).

  References: ALGORITHM.md section 7 (RLoRA).
  """
  return elementwise_compress(U, residual, topk_count(keep_ratio, U.size),
                              lambda v, k: random_k_mask(key, v.shape, k), rescale=rescale)


def svd_topm(P: jax.Array, m: jax.Array | int):
  """SLoRA client step: thin SVD of the local product and a mask of the top-m triplets.

  The full thin SVD (r_max = min(d_out, d_in) triplets, static) is computed and the top m are
  selected by mask, so a new traced m never recompiles. Only the masked triplets are sent
  (m (d_in + d_out + 1) values); the unmasked entries of the outputs are not part of the
  payload. When P = B A is a rank-r adapter product, only the top r_cap = max possible m
  (<= r) triplets are ever needed, so a cheaper implementation could compute just those (e.g.
  from QR of B and A^T and an r x r SVD); this one keeps the plain dense SVD, matching the
  baseline's stated cost (a d_out x d_in product and an SVD per layer).

  Args:
    P: [d_out, d_in] the client's local adapter product.
    m: traced int scalar, triplets to keep.

  Returns:
    (U [d_out, r_max], s [r_max] descending, Vt [r_max, d_in], mask float32 [r_max]).

  References: ALGORITHM.md section 7 (SLoRA).
  """
  U, s, Vt = lapack.svd(P)
  mask = (jnp.arange(s.shape[0]) < m).astype(jnp.float32)
  return U, s, Vt, mask


def reconstruct(U: jax.Array, s: jax.Array, Vt: jax.Array, mask: jax.Array) -> jax.Array:
  """Product of the kept triplets, sum_{i: mask_i = 1} s_i u_i v_i^T.

  Args:
    U: [d_out, r_max].
    s: [r_max].
    Vt: [r_max, d_in].
    mask: float32 [r_max].

  Returns:
    [d_out, d_in].

  References: ALGORITHM.md section 7 (SLoRA).
  """
  return (U * (s * mask)[None, :]) @ Vt


def aggregate_reconstructions(Us: jax.Array, ss: jax.Array, Vts: jax.Array, masks: jax.Array,
                              p: jax.Array) -> jax.Array:
  """SLoRA server step: exact weighted average of the clients' reconstructed products.

  Args:
    Us: [K, d_out, r_max].
    ss: [K, r_max].
    Vts: [K, r_max, d_in].
    masks: [K, r_max].
    p: [K] aggregation weights (used as given; they sum to 1 for FedAvg).

  Returns:
    [d_out, d_in] = sum_k p_k reconstruct(U_k, s_k, Vt_k, mask_k).

  References: ALGORITHM.md sections 3 and 7 (SLoRA).
  """
  coef = p[:, None] * ss * masks  # [K, r_max]: fold weight, singular value and mask together
  return jnp.einsum("kor,kr,kri->oi", Us, coef, Vts)


def refactorize(P_mean: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
  """SLoRA server step: factors of rank r whose product is the best rank-r approximation.

  B = U_r sqrt(S_r), A = sqrt(S_r) Vt_r, splitting each singular value evenly, so B A is the
  truncated SVD of P_mean (Eckart-Young) and the columns of B and the rows of A are mutually
  orthogonal. If rank > min(d_out, d_in) the missing components are zero.

  Args:
    P_mean: [d_out, d_in] averaged product.
    rank: static r.

  Returns:
    (B [d_out, r], A [r, d_in]).

  References: ALGORITHM.md section 7 (SLoRA).
  """
  U, s, Vt = lapack.svd(P_mean)
  r_max = s.shape[0]
  keep = min(rank, r_max)
  root = jnp.sqrt(s[:keep])
  B = U[:, :keep] * root[None, :]
  A = root[:, None] * Vt[:keep]
  if rank > keep:
    B = jnp.pad(B, ((0, 0), (0, rank - keep)))
    A = jnp.pad(A, ((0, rank - keep), (0, 0)))
  return B, A
