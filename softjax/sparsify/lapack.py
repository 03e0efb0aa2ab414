"""QR, SVD and triangular solves that a vmap turns into a loop on CPU (a deadlock workaround).

jaxlib's CPU kernels for a batched QR / SVD / triangular solve split the batch over XLA's
intra-op thread pool and block the worker they run on until every piece is done. XLA's CPU
executor runs independent operations of one program at the same time, so two batched calls can
each hold a worker while waiting for pieces queued behind the other: with 2 workers (a 2-core
machine) the program waits forever with the CPU idle. Seen in jaxlib 0.10.2 as a three-seed
sweep of SOFT's score diagnostics hanging in its first round; stacks and reproduction in
docs/design.md. An unbatched call never waits on the pool, so under `jax.vmap` these wrappers
run one matrix at a time (`lax.map`), on the CPU backend only. For the r x r cores and thin
d x r factors of the diagnostics and the server step this costs little; SLoRA's d_out x d_in
SVDs lose the batch's two-worker split (not measured). On other backends the batched kernels
are used as they are.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp


def one_at_a_time(fn: Callable) -> Callable:
  """`fn` of array arguments whose vmap is a sequential `lax.map` on CPU (nested vmaps nest)."""
  wrapped = jax.custom_batching.custom_vmap(fn)

  @wrapped.def_vmap
  def _rule(axis_size, in_batched, *args):
    if jax.default_backend() != "cpu":
      outs = jax.vmap(fn, in_axes=[0 if b else None for b in in_batched])(*args)
    else:
      batched = [a for a, b in zip(args, in_batched) if b]

      def one(items):
        it = iter(items)
        return wrapped(*[next(it) if b else a for a, b in zip(args, in_batched)])

      outs = jax.lax.map(one, batched)
    return outs, jax.tree.map(lambda _: True, outs)

  return functools.wraps(fn)(wrapped)


@one_at_a_time
def qr(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Thin QR, (Q [m, k], R [k, n]) with k = min(m, n)."""
  return jnp.linalg.qr(x)


@one_at_a_time
def svd(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Thin SVD, (U, s descending, Vt)."""
  return jnp.linalg.svd(x, full_matrices=False)


@one_at_a_time
def singular_values(x: jax.Array) -> jax.Array:
  """Singular values, descending."""
  return jnp.linalg.svd(x, compute_uv=False)


@one_at_a_time
def solve_upper(r: jax.Array, b: jax.Array) -> jax.Array:
  """X with R X = b for an upper-triangular R."""
  return jax.scipy.linalg.solve_triangular(r, b, lower=False)
