"""One upload interface for every method: dense, SOFT, TLoRA, RLoRA and SLoRA.

A `Sparsifier` says how one client turns its trained LoRA factors into an upload (`compress`,
run per client inside the jitted round) and how the server turns the K uploads into the next
global factors (`aggregate`). Every method counts its payload with the same accounting
(`payload.py`, ALGORITHM.md 2.5), on the device, from the masks it actually used.

References: ALGORITHM.md sections 2 (SOFT), 3 (aggregation) and 7 (baselines).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from softjax.config.choices import AGGREGATIONS, ERROR_FEEDBACK_METHODS, METHODS  # noqa: F401  (re-exported)
from softjax.models import lora as lora_lib
from softjax.sparsify import baselines, payload, soft
from softjax.sparsify import masks as masks_lib

PyTree = Any








class Upload(NamedTuple):
  """What one client sends in one round, and what it keeps."""
  sent: PyTree  # what the server receives (LoRA structure; SLoRA: {"P": product} per layer)
  support: PyTree  # 1.0 where an entry was sent, same structure as `sent`
  residual: PyTree  # the client's new error-feedback residual (LoRA structure)
  values: jax.Array  # int32 [], LoRA values sent
  index_bits: jax.Array  # int32 [], bits naming which values were sent
  dropped_energy: jax.Array  # float32 [], energy left out of this upload


class Sparsifier(NamedTuple):
  """compress(global, local, residual, keep_ratio, key) -> Upload;
  aggregate(global, sent [K], support [K], weights [K]) -> next global LoRA tree."""
  name: str
  compress: Callable[..., Upload]
  aggregate: Callable[..., PyTree]
  error_feedback: bool  # residuals persist across rounds (all N clients)
  factor_upload: bool  # `sent` has the LoRA structure (covariance diagnostic defined)


def weighted_sum(stacked: PyTree, weights: jax.Array) -> PyTree:
  """sum_k p_k x_k over the leading client axis of every leaf ([K, ...] -> [...])."""
  return jax.tree.map(lambda x: jnp.tensordot(weights, x, axes=1), stacked)


def _aggregate_factors(senders_only: bool):
  """B^{t+1} = B^t + sum_k p_k sent_k, leaf by leaf (B and A separately), ALGORITHM.md 3.

  With senders_only, every entry is averaged over the clients that sent it instead:
  sum_k p_k sent_k / sum_k p_k support_k (0 where nobody sent it).
  """

  def aggregate(global_lora, sent, support, weights):
    total = weighted_sum(sent, weights)
    if senders_only:
      cover = weighted_sum(support, weights)
      total = jax.tree.map(lambda t, c: jnp.where(c > 0, t / jnp.where(c > 0, c, 1.0), 0.0),
                           total, cover)
    return optax.tree.add(global_lora, total)

  return aggregate


def _int(x) -> jax.Array:
  return jnp.asarray(x, jnp.int32)


def _dense(senders_only: bool) -> Sparsifier:
  """Every component of the update, no index bits ("ideal" federated LoRA)."""

  def compress(global_lora, local_lora, residual, keep_ratio, key):
    del residual, keep_ratio, key
    sent = optax.tree.sub(local_lora, global_lora)
    return Upload(sent=sent, support=jax.tree.map(jnp.ones_like, sent),
                  residual=jax.tree.map(jnp.zeros_like, sent),
                  values=_int(lora_lib.lora_num_values(global_lora)),
                  index_bits=_int(0), dropped_energy=jnp.zeros((), jnp.float32))

  return Sparsifier("dense", compress, _aggregate_factors(senders_only), False, True)


def _soft(selection: str, score: str, senders_only: bool, error_feedback: bool) -> Sparsifier:
  """SOFT: per-component norm-product scores, top-m per layer (or global), error feedback."""

  def compress(global_lora, local_lora, residual, keep_ratio, key):
    del key
    sent, new_residual, masks, dropped = soft.soft_compress(
        global_lora, local_lora, residual, keep_ratio, selection=selection, score=score)
    dims = lora_lib.lora_layer_dims(global_lora)
    values = sum(_int(jnp.sum(mask)) * (d_in + d_out)
                 for mask, (_, d_in, d_out) in zip(masks, dims))
    index = sum(payload.index_bits_per_layer(mask.shape[0], _int(jnp.sum(mask)))
                for mask in masks)
    pairs, treedef = lora_lib.factor_pairs(sent)
    support = jax.tree.unflatten(treedef, [
        {"A": jnp.broadcast_to(mask[:, None], p["A"].shape),
         "B": jnp.broadcast_to(mask[None, :], p["B"].shape)} for p, mask in zip(pairs, masks)])
    return Upload(sent=sent, support=support, residual=new_residual, values=_int(values),
                  index_bits=_int(index), dropped_energy=dropped)

  return Sparsifier("soft", compress, _aggregate_factors(senders_only), error_feedback, True)


def _elementwise(name: str, senders_only: bool, error_feedback: bool,
                 rescale: bool) -> Sparsifier:
  """TLoRA (magnitude top-k) or RLoRA (random-k from a key shared with the server), applied to
  every factor matrix separately with keep ratio O."""

  def compress(global_lora, local_lora, residual, keep_ratio, key):
    update = optax.tree.sub(local_lora, global_lora)
    leaves, treedef = jax.tree.flatten(update)
    res_leaves = jax.tree.leaves(residual)
    sent, new_res, support = [], [], []
    values = index = 0
    dropped = jnp.zeros((), jnp.float32)
    for i, (u, e) in enumerate(zip(leaves, res_leaves)):
      k = masks_lib.topk_count(keep_ratio, u.size)
      if name == "tlora":
        s, r = baselines.tlora_compress(u, e, keep_ratio)
        index = index + payload.index_bits_per_layer(u.size, k)
      else:
        # The server regenerates this mask from (seed, round, client, matrix): no index bits.
        s, r = baselines.rlora_compress(jax.random.fold_in(key, i), u, e, keep_ratio,
                                          rescale=rescale)
      sent.append(s)
      new_res.append(r)
      support.append((s != 0).astype(jnp.float32))
      values = values + k
      if not rescale:  # with rescaling nothing is kept back, so nothing counts as dropped
        dropped = dropped + jnp.sum(jnp.square(u + e - s))
    unflat = lambda xs: jax.tree.unflatten(treedef, xs)  # noqa: E731
    return Upload(sent=unflat(sent), support=unflat(support), residual=unflat(new_res),
                  values=_int(values), index_bits=_int(index), dropped_energy=dropped)

  return Sparsifier(name, compress, _aggregate_factors(senders_only),
                    error_feedback and not rescale, True)


def _slora() -> Sparsifier:
  """SLoRA [choice]: the client sends the top-m singular triplets of its adapter product B A;
  the server averages the reconstructed products exactly and refactorizes the mean to rank r.
  No error feedback (the residual would be a d_out x d_in matrix per layer per client)."""

  def compress(global_lora, local_lora, residual, keep_ratio, key):
    del residual, key
    pairs, treedef = lora_lib.factor_pairs(local_lora)
    sent, values, dropped = [], 0, jnp.zeros((), jnp.float32)
    for p in pairs:
      m = masks_lib.kept_count(keep_ratio, p["A"].shape[0])
      U, s, Vt, mask = baselines.svd_topm(p["B"] @ p["A"], m)
      sent.append({"P": baselines.reconstruct(U, s, Vt, mask)})
      d_out, d_in = p["B"].shape[0], p["A"].shape[1]
      values = values + m * (d_in + d_out + 1)
      dropped = dropped + jnp.sum(jnp.square(s) * (1.0 - mask))
    sent = jax.tree.unflatten(treedef, sent)
    return Upload(sent=sent, support=jax.tree.map(jnp.ones_like, sent),
                  residual=jax.tree.map(jnp.zeros_like, global_lora), values=_int(values),
                  index_bits=_int(0), dropped_energy=dropped)

  def aggregate(global_lora, sent, support, weights):
    del support
    mean = weighted_sum(sent, weights)
    layers, treedef = jax.tree.flatten(mean, is_leaf=lambda n: isinstance(n, dict) and "P" in n)
    factors = []
    for layer, old in zip(layers, lora_lib.factor_pairs(global_lora)[0]):
      B, A = baselines.refactorize(layer["P"], old["A"].shape[0])
      factors.append({"A": A, "B": B})
    return jax.tree.unflatten(treedef, factors)

  return Sparsifier("slora", compress, aggregate, False, False)


def make_sparsifier(name: str = "dense", *, selection: str = "per_layer",
                    score: str = "factors", aggregation: str = "all",
                    error_feedback: bool = True, rlora_rescale: bool = False) -> Sparsifier:
  """The upload method `name` (one of METHODS) with its switches.

  Args:
    name: dense | soft | tlora | rlora | slora.
    selection: SOFT only: per_layer (default [choice]) or global top-(m L).
    score: SOFT only: factors (default [choice]) or update.
    aggregation: all (a component a client did not send counts as zero, default [choice]) or
      senders (average each entry over the clients that sent it). Not for slora.
    error_feedback: keep residuals (soft, tlora, rlora); off is an ablation.
    rlora_rescale: RLoRA's 1/O rescaling switch (turns error feedback off).
  """
  senders_only = aggregation == "senders"
  if name == "dense":
    return _dense(senders_only)
  if name == "soft":
    return _soft(selection, score, senders_only, error_feedback)
  if name in ("tlora", "rlora"):
    return _elementwise(name, senders_only, error_feedback, rlora_rescale and name == "rlora")
  if name == "slora":
    return _slora()
  raise ValueError(f"unknown method {name!r}; allowed: {', '.join(METHODS)}")
