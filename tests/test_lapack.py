"""sparsify/lapack.py: the same numbers as jnp.linalg, and no batched LAPACK call on CPU.

A batched LAPACK call can deadlock a 2-worker CPU pool (the module docstring); a hang is a bad
test, so the compiled programs are checked instead: every LAPACK custom call in them takes a
single matrix, however many vmaps (clients, sweep members) wrap the call.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np

from softjax.sparsify import baselines, diagnostics, lapack
from softjax.sparsify import reorthogonalize as reorth

_LAPACK_CALL = re.compile(r"= \(?([a-z0-9]+\[[0-9,]*\])[^\n]*custom_call_target=\"lapack_")


def lapack_operand_ranks(fn, *args) -> list[int]:
  """Ranks of the first result of every LAPACK custom call in fn's compiled CPU program."""
  text = jax.jit(fn).lower(*args).compile().as_text()
  shapes = _LAPACK_CALL.findall(text)
  return [len(s[s.index("[") + 1:-1].split(",")) for s in shapes]


def stack(seed=0, lead=(3, 2), d=9, r=4):
  return jax.random.normal(jax.random.key(seed), lead + (d, r))


def test_nested_vmaps_match_jnp_linalg():
  x = stack()
  twice = lambda f: jax.vmap(jax.vmap(f))  # noqa: E731
  for ours, ref in [(lapack.qr, jnp.linalg.qr),
                    (lapack.svd, lambda m: jnp.linalg.svd(m, full_matrices=False)),
                    (lapack.singular_values, lambda m: jnp.linalg.svd(m, compute_uv=False))]:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                 jax.jit(twice(ours))(x), twice(ref)(x))
  upper = jnp.triu(x[..., :4, :]) + 4.0 * jnp.eye(4)
  rhs = jnp.arange(8.0).reshape(4, 2)
  solved = jax.vmap(jax.vmap(lapack.solve_upper, in_axes=(0, None)), in_axes=(0, None))(
      upper, rhs)
  np.testing.assert_allclose(upper @ solved, np.broadcast_to(rhs, solved.shape), atol=1e-5)


def test_unbatched_calls_are_left_alone():
  x = stack(lead=())
  np.testing.assert_array_equal(lapack.singular_values(x),
                                jnp.linalg.svd(x, compute_uv=False))
  assert lapack_operand_ranks(lapack.singular_values, x) == [2]


def test_the_round_s_lapack_users_never_batch_a_call():
  """Score diagnostics (per client, per seed), the server's re-orthogonalization (per seed) and
  SLoRA's client and server SVDs: all LAPACK calls take one matrix."""
  lora = {"q": {"A": stack(1, (3, 2), 4, 9), "B": stack(2)},
          "v": {"A": stack(3, (3, 2), 4, 9), "B": stack(4)}}
  ranks = lapack_operand_ranks(jax.vmap(jax.vmap(diagnostics.score_diagnostics)), lora)
  one_seed = jax.tree.map(lambda x: x[:, 0], lora)
  ranks += lapack_operand_ranks(jax.vmap(lambda t: reorth.reorthogonalize(t)[0]), one_seed)
  products = jax.random.normal(jax.random.key(5), (3, 2, 9, 9))
  ranks += lapack_operand_ranks(
      jax.vmap(jax.vmap(lambda p: baselines.svd_topm(p, 2)[1])), products)
  ranks += lapack_operand_ranks(jax.vmap(lambda p: baselines.refactorize(p, 4)[0]),
                                products[:, 0])
  assert len(ranks) >= 8 and set(ranks) == {2}, ranks
