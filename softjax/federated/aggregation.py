"""Server-side aggregation helpers: data-size weights and round diagnostics.

References: ALGORITHM.md section 3.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from softjax.federated.types import PyTree
from softjax.sparsify import diagnostics


def aggregation_weights(counts: jax.Array) -> jax.Array:
  """p_k = n_k / sum_{j in S_t} n_j (ALGORITHM.md section 3). counts: [K] -> [K]; all zeros
  (every upload lost) gives zero weights, so the global model stays as it is."""
  counts = counts.astype(jnp.float32)
  total = counts.sum()
  return counts / jnp.where(total > 0, total, 1.0)


def covariance_diagnostic(global_lora: PyTree, sent: PyTree, weights: jax.Array) -> jax.Array:
  """Sum over layers of the covariance term of separate B/A averaging (ALGORITHM.md 3), for
  the factors the server received, B_k = B^t + sent_k (r x r Gram matrices only)."""
  received = jax.tree.map(lambda g, s: g[None] + s, global_lora, sent)
  terms = diagnostics.covariance_terms(received, weights)
  return jnp.sum(terms) if terms.size else jnp.zeros((), jnp.float32)


def client_score_diagnostics(global_lora: PyTree, uploads_sent: PyTree, residual: PyTree,
                             valid: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(score gap averaged over the real slots, score energy summed over them) of the factors
  each client scored: B^t + sent_k + residual_k = its trained factors plus its residual."""
  if not jax.tree.leaves(global_lora):  # head-only fine-tuning: nothing is scored
    return jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
  scored = jax.tree.map(lambda g, s, r: g[None] + s + r, global_lora, uploads_sent, residual)
  gaps, energy = jax.vmap(diagnostics.score_diagnostics)(scored)
  count = jnp.maximum(valid.sum(), 1.0)
  return jnp.dot(valid, gaps) / count, jnp.dot(valid, energy)


def global_orth_residual(lora: PyTree) -> jax.Array:
  rb, ra = diagnostics.orthogonality_residuals(lora)
  if rb.size == 0:
    return jnp.zeros((2,), jnp.float32)
  return jnp.stack([rb.mean(), ra.mean()])
