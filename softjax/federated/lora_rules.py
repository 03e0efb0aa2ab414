"""Federated LoRA aggregation rules, as pure functions of one layer's received factors.

Every rule reads the K clients' factors B_k [K, d_out, r], A_k [K, r, d_in] and the weights
p [K] (`aggregation.aggregation_weights`, summing to 1), and returns a `LayerAggregate`: the
next global factors and, for the rules that change the frozen weight, that change in factored
form, W0 <- W0 + s * fold_left @ fold_right (s = alpha / r, the adapter scale). Keeping the fold
factored is what the downlink sends and costs O((d_in + d_out) j) instead of d_out x d_in.

The ideal aggregate is the weighted mean of the clients' products, sum_k p_k B_k A_k. What a
rule leaves of it is `aggregation_error`: for separate averaging it is the covariance term of
ALGORITHM.md 3; FLoRA and FedEx-LoRA fold it into W0 and leave none; FlexLoRA leaves its
truncation.

The per-layer functions compute the server's side. The last section says, for the rules a run
can select (`method.rule`, config/choices.AGGREGATION_RULES), which factors a client trains in
a round (FFA-LoRA and FedSVD: B only; RoLoRA: B, then A, by round) and how the server turns
the received factors into the next global ones; the round applies both
(federated/round.py), which also keeps FedSA-LoRA's per-client B and the folds of FedEx-LoRA
and FLoRA (`fold_update`), and trains each HetLoRA client at its own rank
(`client_rank_keep`, `truncated`; its server side is separate averaging of the zero-padded
factors, `hetlora`). On the host, `upload_bits` prices a client's dense upload under a rule the
way the round counts it, for the latency controllers.

References: docs/algorithm.md section 5 (each rule's update and its source paper).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from softjax.models.lora import factor_pairs, is_fold, scale_components
from softjax.sparsify import lapack
from softjax.sparsify.reorthogonalize import product_svd

_HI = jax.lax.Precision.HIGHEST


class LayerAggregate(NamedTuple):
  """The server's result for one layer."""
  B: jax.Array  # [d_out, r], or [K, d_out, r] where each client keeps its own B (FedSA-LoRA)
  A: jax.Array  # [r, d_in]
  fold_left: jax.Array | None = None  # [d_out, j]: W0 += s * fold_left @ fold_right
  fold_right: jax.Array | None = None  # [j, d_in]


def _mean(x: jax.Array, p: jax.Array) -> jax.Array:
  return jnp.tensordot(p, x, axes=1, precision=_HI)


def _stacked(B: jax.Array, A: jax.Array, p: jax.Array) -> tuple[jax.Array, jax.Array]:
  """sum_k p_k B_k A_k as one product: [p_1 B_1 | ... | p_K B_K] @ [A_1; ...; A_K]."""
  k, d_out, r = B.shape
  left = jnp.moveaxis(p[:, None, None] * B, 0, 1).reshape(d_out, k * r)
  return left, A.reshape(k * r, A.shape[-1])


def fedit(B: jax.Array, A: jax.Array, p: jax.Array) -> LayerAggregate:
  """Separate averaging (FedIT): Bbar = sum_k p_k B_k, Abar = sum_k p_k A_k."""
  return LayerAggregate(B=_mean(B, p), A=_mean(A, p))


def ffa(B: jax.Array, A: jax.Array, p: jax.Array) -> LayerAggregate:
  """FFA-LoRA: A stays at its initialization (every client holds the same one), B averaged;
  with A shared the average of the products is exact, Bbar A."""
  return LayerAggregate(B=_mean(B, p), A=A[0])


def fedsa(B: jax.Array, A: jax.Array, p: jax.Array) -> LayerAggregate:
  """FedSA-LoRA: A averaged and shared; each client keeps its own B (returned per client)."""
  return LayerAggregate(B=B, A=_mean(A, p))


def rolora(B: jax.Array, A: jax.Array, p: jax.Array, train_b: jax.Array) -> LayerAggregate:
  """RoLoRA: in a round that trains B (`train_b` true) B is averaged and A was frozen; in the
  next A is averaged and B was frozen. The frozen factor is the same on every client, so either
  round's aggregate is the exact average of the products."""
  return LayerAggregate(B=jnp.where(train_b, _mean(B, p), B[0]),
                        A=jnp.where(train_b, A[0], _mean(A, p)))


def flora(B: jax.Array, A: jax.Array, p: jax.Array, fresh_A: jax.Array) -> LayerAggregate:
  """FLoRA: the stacked factors give sum_k p_k B_k A_k exactly; it is folded into W0 and the
  adapter restarts from B = 0 and a fresh A (`fresh_A` [r, d_in])."""
  left, right = _stacked(B, A, p)
  return LayerAggregate(B=jnp.zeros_like(B[0]), A=fresh_A, fold_left=left, fold_right=right)


def fedex(B: jax.Array, A: jax.Array, p: jax.Array) -> LayerAggregate:
  """FedEx-LoRA: separate averaging, plus the residual sum_k p_k B_k A_k - Bbar Abar folded
  into W0, sent factored as [p_1 B_1 | ... | p_K B_K | -Bbar] @ [A_1; ...; A_K; Abar]."""
  mean = fedit(B, A, p)
  left, right = _stacked(B, A, p)
  return mean._replace(fold_left=jnp.concatenate([left, -mean.B], axis=1),
                       fold_right=jnp.concatenate([right, mean.A], axis=0))


def flexlora(B: jax.Array, A: jax.Array, p: jax.Array, rank: int) -> LayerAggregate:
  """FlexLoRA: the average of the products, truncated to its best rank-`rank` approximation
  (Eckart-Young) by an SVD of the stacked factors, never the d_out x d_in product; singular
  values on B, so A's rows come out orthonormal. Components beyond the K r the clients sent
  are zero."""
  left, right = _stacked(B, A, p)
  q_l, u, s, vt, q_r, _ = product_svd(left, right)
  new_b = jnp.matmul(q_l, u[:, :rank] * s[None, :rank], precision=_HI)
  new_a = jnp.matmul(vt[:rank], q_r.T, precision=_HI)
  pad = rank - new_b.shape[1]
  if pad > 0:
    new_b = jnp.pad(new_b, ((0, 0), (0, pad)))
    new_a = jnp.pad(new_a, ((0, pad), (0, 0)))
  return LayerAggregate(B=new_b, A=new_a)


def fedsvd(B: jax.Array, A: jax.Array, p: jax.Array) -> LayerAggregate:
  """FedSVD-style: clients train B with A shared; the server re-factorizes Bbar A = U S V^T
  (thin QR of A^T and an SVD of the d_out x r matrix Bbar R^T), so the next A = V^T has
  orthonormal rows and B = U S; the product is kept exactly."""
  q_b, u, s, vt, q_a, _ = product_svd(_mean(B, p), A[0])
  return LayerAggregate(B=jnp.matmul(q_b, u * s[None, :], precision=_HI),
                        A=jnp.matmul(vt, q_a.T, precision=_HI))


def rank_mask(ranks: jax.Array, r_max: int) -> jax.Array:
  """[K, r_max] 1 on each client's first ranks[k] components (HetLoRA's zero padding)."""
  return (jnp.arange(r_max)[None, :] < ranks[:, None]).astype(jnp.float32)


def hetlora(B: jax.Array, A: jax.Array, p: jax.Array, ranks: jax.Array) -> LayerAggregate:
  """Heterogeneous ranks (HetLoRA-style): client k's factors are zero beyond its rank, the
  server averages the padded factors at r_max; each client then truncates the global factors
  to its own rank (`truncated`). Masking keeps every client in one vmapped shape."""
  mask = rank_mask(ranks, B.shape[-1])
  return fedit(B * mask[:, None, :], A * mask[:, :, None], p)


def client_rank_keep(ranks: tuple[int, ...], client_id: jax.Array, r_max: int) -> jax.Array:
  """[r_max] 1 on client `client_id`'s first ranks[client_id mod len(ranks)] components.
  [choice] Ranks are dealt to clients cyclically by id (HetLoRA draws them from the devices'
  capabilities); with a random partition an id says nothing about a client's data, and a
  rank list with repeats sets the proportions."""
  rank = jnp.asarray(ranks, jnp.int32)[client_id % len(ranks)]
  return rank_mask(rank[None], r_max)[0]


def truncated(lora, keep: jax.Array):
  """A client's view of the rank-r_max LoRA tree at its own rank: every layer's components
  where `keep` [r_max] is 0 set to zero (columns of B, rows of A)."""
  return scale_components(lora, keep, keep)


def _frobenius(left: jax.Array, right: jax.Array) -> jax.Array:
  """||left @ right||_F as ||R_L R_R^T||_F from thin QR factors (a j x j core), so that a
  near-exact rule's small error is not lost to cancellation between large Gram traces."""
  _, r_l = lapack.qr(left)
  _, r_r = lapack.qr(right.T)
  return jnp.linalg.norm(jnp.matmul(r_l, r_r.T, precision=_HI))


def aggregation_error(B: jax.Array, A: jax.Array, p: jax.Array,
                      result: LayerAggregate) -> jax.Array:
  """||sum_k p_k B_k A_k - (fold + what the clients hold next)||_F, without any d_out x d_in
  product. What the clients hold next is Bbar A, or sum_k p_k B_k A for a per-client B."""
  ideal = _stacked(B, A, p)
  parts = [(result.fold_left, result.fold_right)] if result.fold_left is not None else []
  if result.B.ndim == 3:
    parts.append(_stacked(result.B, jnp.broadcast_to(result.A, A.shape), p))
  else:
    parts.append((result.B, result.A))
  # ideal - held as one factored product: [L_ideal | -L_held] @ [R_ideal; R_held].
  left = jnp.concatenate([ideal[0]] + [-l for l, _ in parts], axis=1)
  right = jnp.concatenate([ideal[1]] + [r for _, r in parts], axis=0)
  return _frobenius(left, right)


# ------------------------------------------------------------------ the rules a run can select


def trained_factors(rule: str, round_index: jax.Array) -> jax.Array:
  """[2] float32 (train B, train A) in round `round_index` (0-based) under `rule`.

  RoLoRA starts with B: at B = 0 (the LoRA initialization) the gradient of A is zero."""
  if rule in ("ffa", "fedsvd"):
    return jnp.array([1.0, 0.0])
  if rule == "rolora":
    train_b = (round_index % 2 == 0).astype(jnp.float32)
    return jnp.stack([train_b, 1.0 - train_b])
  return jnp.ones((2,), jnp.float32)


def sent_factors(rule: str, round_index: int) -> tuple[bool, bool]:
  """(sends B, sends A) in a client's dense upload under `rule` in round `round_index`, on the
  host: the factors it trains (`trained_factors`), less FedSA-LoRA's B, which stays home."""
  if rule in ("ffa", "fedsvd"):
    return True, False
  if rule == "rolora":
    return round_index % 2 == 0, round_index % 2 == 1
  if rule == "fedsa":
    return False, True
  return True, True


def component_values(rule: str, layer_dims, round_index: int | None = None) -> int:
  """Values one rank component costs in every adapted layer together, sum_l of d_out_l (B's
  column) and d_in_l (A's row) where `rule` sends them in `round_index`; None: the dearer of
  the rule's rounds (what a plan made before the rounds must afford)."""
  rounds = (0, 1) if round_index is None else (round_index,)
  per_round = []
  for t in rounds:
    send_b, send_a = sent_factors(rule, t)
    per_round.append(sum(send_b * d_out + send_a * d_in for d_in, d_out in layer_dims))
  return max(per_round)


def upload_bits(rule: str, layer_dims, rank: int, round_index: int, client_ids,
                client_ranks: tuple[int, ...] = (), *, value_bits: int,
                head_params: int) -> np.ndarray:
  """[K] bits each sampled client's dense upload costs under `rule` in round `round_index`,
  on the host (what the round's metrics count: ALGORITHM.md 2.5 with m = r_k, no index bits).
  A HetLoRA client sends its own rank r_k = client_ranks[k mod len] of components."""
  ids = np.asarray(client_ids)
  ranks = (np.asarray(client_ranks)[ids % len(client_ranks)] if client_ranks
           else np.full(ids.shape, rank))
  values = ranks * component_values(rule, layer_dims, round_index) + head_params
  return (value_bits * values).astype(np.int64)


def _received(global_lora, sent):
  """Per layer the clients' factors (B_k, A_k) = global + sent_k, [K, ...]; and the treedef."""
  pairs, treedef = factor_pairs(jax.tree.map(lambda g, s: g[None] + s, global_lora, sent))
  return [(p["B"], p["A"]) for p in pairs], treedef


def server_update(rule: str, global_lora, sent, weights: jax.Array, averaged):
  """The next global LoRA tree under `rule`, from the separate average `averaged` (what the
  dense aggregation gives) and the clients' factors: FedSVD and FlexLoRA re-factorize, the
  others keep the average (with a frozen factor shared by every client it is already exact)."""
  if rule not in ("fedsvd", "flexlora"):
    return averaged
  layers, treedef = _received(global_lora, sent)
  out = []
  for b, a in layers:
    if rule == "fedsvd":
      result = fedsvd(b, a, weights)
    else:
      result = flexlora(b, a, weights, rank=b.shape[-1])
    out.append({"A": result.A, "B": result.B})
  return jax.tree.unflatten(treedef, out)


FOLDING_RULES = ("fedex", "flora")  # the rules that fold into the frozen weights


def _folding_aggregate(rule: str, b: jax.Array, a: jax.Array, p: jax.Array,
                       new: dict) -> LayerAggregate:
  """A folding rule's layer result around the factors the server holds next (`new`).
  FedEx-LoRA (`new` the separate average): the fold [p_1 B_1 | ... | p_K B_K | -B'] @
  [A_1; ...; A_K; A'], which leaves nothing of sum_k p_k B_k A_k whatever rounding the average
  had. FLoRA (`new` the restarted adapter, B' = 0): the fold is the whole stacked product."""
  if rule == "flora":
    return flora(b, a, p, new["A"])
  left, right = _stacked(b, a, p)
  return LayerAggregate(B=new["B"], A=new["A"],
                        fold_left=jnp.concatenate([left, -new["B"]], axis=1),
                        fold_right=jnp.concatenate([right, new["A"]], axis=0))


def fold_update(rule: str, global_lora, sent, weights: jax.Array, new_lora, folds):
  """A folding rule's server side: each layer's fold (lora.zero_folds) grows by
  sum_k p_k B_k A_k - B' A' of this round (FedEx-LoRA: the residual of separate averaging;
  FLoRA: with B' = 0, the whole mean product), so that frozen + fold + B' A' is the exact
  average of the clients' models. One d_out x d_in product per layer, on the server only."""
  layers, _ = _received(global_lora, sent)
  new_pairs, _ = factor_pairs(new_lora)
  leaves, treedef = jax.tree.flatten(folds, is_leaf=is_fold)
  out = []
  for fold, (b, a), new in zip(leaves, layers, new_pairs):
    result = _folding_aggregate(rule, b, a, weights, new)
    out.append({"W": fold["W"] + jnp.matmul(result.fold_left, result.fold_right,
                                            precision=_HI)})
  return jax.tree.unflatten(treedef, out)


def fold_downlink_values(rule: str, global_lora, senders: jax.Array) -> jax.Array:
  """Values a factored fold adds to the broadcast: per layer (d_out + d_in) j, with j = r
  senders columns for FLoRA (the senders' p_k B_k and A_k) and r (senders + 1) for FedEx-LoRA
  (also -B' and A'); a client whose upload was lost adds a zero column, which is not sent, and
  nothing is sent when no upload arrived. [choice] FLoRA's fresh A is drawn from the round's
  key, which clients share, so it costs no bits."""
  pairs, _ = factor_pairs(global_lora)
  per_column = sum((p["B"].shape[0] + p["A"].shape[1]) * p["B"].shape[1] for p in pairs)
  columns = senders if rule == "flora" else senders + (senders > 0)
  return (per_column * columns).astype(jnp.int32)


def restarted(lora, key: jax.Array):
  """FLoRA's adapter after a fold: B = 0 and a fresh Gaussian A (std 1/sqrt(d_in), the LoRA
  initialization of ALGORITHM.md 1), one key per layer folded from `key`."""
  pairs, treedef = factor_pairs(lora)
  out = []
  for i, pair in enumerate(pairs):
    r, d_in = pair["A"].shape
    a = jax.random.normal(jax.random.fold_in(key, i), (r, d_in), pair["A"].dtype)
    out.append({"A": a / jnp.sqrt(jnp.float32(d_in)), "B": jnp.zeros_like(pair["B"])})
  return jax.tree.unflatten(treedef, out)


def rule_error(rule: str, global_lora, sent, weights: jax.Array, new_lora) -> jax.Array:
  """Sum over layers of `aggregation_error` of the new global factors (the rule's
  covariance-term analogue: what it leaves of sum_k p_k B_k A_k); for a folding rule, of the
  factors plus this round's fold."""
  layers, _ = _received(global_lora, sent)
  new_pairs, _ = factor_pairs(new_lora)
  total = jnp.zeros((), jnp.float32)
  for (b, a), new in zip(layers, new_pairs):
    result = (_folding_aggregate(rule, b, a, weights, new) if rule in FOLDING_RULES
              else LayerAggregate(B=new["B"], A=new["A"]))
    total = total + aggregation_error(b, a, weights, result)
  return total
