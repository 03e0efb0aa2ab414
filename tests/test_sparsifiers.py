"""Every upload method through the one Sparsifier interface, and inside the jitted round."""

import collections
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from softjax.federated import round as round_lib
from softjax.federated import schedule
from softjax.federated import types as fl_types
from softjax.sparsify import masks as masks_lib
from softjax.sparsify import payload
from softjax.sparsify import sparsifier as sparsifiers
from tests import support

D_IN, D_OUT, R = 6, 5, 4


def lora_tree(key, scale=1.0):
  """Two adapted layers of [r, d_in] / [d_out, r] factors."""
  k = jax.random.split(key, 4)
  layer = lambda a, b: {"A": scale * jax.random.normal(a, (R, D_IN)),  # noqa: E731
                        "B": scale * jax.random.normal(b, (D_OUT, R))}
  return {"q": layer(k[0], k[1]), "v": layer(k[2], k[3])}


@pytest.mark.parametrize("name", ["soft", "tlora", "rlora"])
@pytest.mark.parametrize("keep_ratio", [0.25, 0.5, 1.0])
def test_error_feedback_invariant(name, keep_ratio):
  """sent + new residual == (local - global) + old residual, leaf by leaf."""
  glob, local = lora_tree(jax.random.key(0)), lora_tree(jax.random.key(1))
  old = lora_tree(jax.random.key(2), scale=0.1)
  method = sparsifiers.make_sparsifier(name)
  up = jax.jit(method.compress)(glob, local, old, jnp.float32(keep_ratio), jax.random.key(3))
  want = jax.tree.map(lambda l, g, e: l - g + e, local, glob, old)
  chex.assert_trees_all_close(optax.tree.add(up.sent, up.residual), want, atol=1e-6)
  assert method.error_feedback


def test_soft_bits_and_support_follow_the_masks():
  glob, local = lora_tree(jax.random.key(0)), lora_tree(jax.random.key(1))
  zeros = jax.tree.map(jnp.zeros_like, glob)
  up = sparsifiers.make_sparsifier("soft").compress(glob, local, zeros, jnp.float32(0.5), None)
  # m = 2 of r = 4 per layer: 2 * (6 + 5) values per layer, index min(4, 2 * 2) = 4 bits.
  assert int(up.values) == 2 * 2 * (D_IN + D_OUT)
  assert int(up.index_bits) == 2 * 4
  assert int(up.values) * 32 + int(up.index_bits) == payload.lora_upload_bits(
      [(D_IN, D_OUT)] * 2, rank=R, kept=2, value_bits=32, head_params=0)
  for layer in ("q", "v"):
    kept_cols = np.asarray(up.support[layer]["B"]).max(0)
    np.testing.assert_array_equal(kept_cols, np.asarray(up.support[layer]["A"]).max(1))
    assert kept_cols.sum() == 2
    # Unsent components are exactly zero in the upload.
    assert np.all(np.asarray(up.sent[layer]["B"])[:, kept_cols == 0] == 0)


def test_elementwise_bits_by_hand():
  glob, local = lora_tree(jax.random.key(0)), lora_tree(jax.random.key(1))
  zeros = jax.tree.map(jnp.zeros_like, glob)
  # O = 0.5: k = 12 of 24 entries in A (4x6) and 10 of 20 in B (5x4); 4 matrices.
  t = sparsifiers.make_sparsifier("tlora").compress(glob, local, zeros, jnp.float32(0.5), None)
  assert int(t.values) == 2 * (12 + 10)
  idx = lambda size, k: min(size, k * math.ceil(math.log2(size)))  # noqa: E731
  assert int(t.index_bits) == 2 * (idx(24, 12) + idx(20, 10)) == 2 * (24 + 20)
  r = sparsifiers.make_sparsifier("rlora").compress(glob, local, zeros, jnp.float32(0.5),
                                                    jax.random.key(5))
  assert int(r.values) == 2 * (12 + 10) and int(r.index_bits) == 0  # mask from a shared seed
  d = sparsifiers.make_sparsifier("dense").compress(glob, local, zeros, jnp.float32(1.0), None)
  assert int(d.values) == 2 * R * (D_IN + D_OUT) and int(d.index_bits) == 0
  s = sparsifiers.make_sparsifier("slora").compress(glob, local, zeros, jnp.float32(0.5), None)
  assert int(s.values) == 2 * 2 * (D_IN + D_OUT + 1) and int(s.index_bits) == 0


def test_rlora_mask_reproducible_from_the_shared_key():
  glob, local = lora_tree(jax.random.key(0)), lora_tree(jax.random.key(1))
  zeros = jax.tree.map(jnp.zeros_like, glob)
  method = sparsifiers.make_sparsifier("rlora")
  a = method.compress(glob, local, zeros, jnp.float32(0.5), jax.random.key(9))
  b = method.compress(glob, local, zeros, jnp.float32(0.5), jax.random.key(9))
  c = method.compress(glob, local, zeros, jnp.float32(0.5), jax.random.key(10))
  chex.assert_trees_all_equal(a.support, b.support)
  assert not np.array_equal(a.support["q"]["A"], c.support["q"]["A"])
  # The server rebuilds the mask of matrix i from fold_in(key, i) alone.
  leaves = jax.tree.leaves(a.support)
  for i, leaf in enumerate(leaves):
    k = masks_lib.topk_count(0.5, leaf.size)
    rebuilt = masks_lib.random_k_mask(jax.random.fold_in(jax.random.key(9), i), leaf.shape, k)
    np.testing.assert_array_equal(rebuilt, leaf)


def test_senders_only_aggregation_by_hand():
  glob = {"l": {"A": jnp.zeros((2, 1)), "B": jnp.zeros((1, 2))}}
  sent = {"l": {"A": jnp.array([[[2.0], [0.0]], [[4.0], [6.0]]]),
                "B": jnp.array([[[1.0, 0.0]], [[3.0, 5.0]]])}}
  support = jax.tree.map(lambda x: (x != 0).astype(jnp.float32), sent)
  p = jnp.array([0.25, 0.75])
  everyone = sparsifiers.make_sparsifier("soft").aggregate(glob, sent, support, p)
  senders = sparsifiers.make_sparsifier("soft", aggregation="senders").aggregate(
      glob, sent, support, p)
  np.testing.assert_allclose(everyone["l"]["A"][:, 0], [0.25 * 2 + 0.75 * 4, 0.75 * 6])
  np.testing.assert_allclose(senders["l"]["A"][:, 0], [0.25 * 2 + 0.75 * 4, 6.0])
  np.testing.assert_allclose(senders["l"]["B"][0], [0.25 * 1 + 0.75 * 3, 5.0])


def test_slora_aggregate_is_the_refactorized_mean_product():
  glob = lora_tree(jax.random.key(0))
  locals_ = [lora_tree(jax.random.key(s)) for s in (1, 2)]
  zeros = jax.tree.map(jnp.zeros_like, glob)
  method = sparsifiers.make_sparsifier("slora")
  ups = [method.compress(glob, l, zeros, jnp.float32(0.5), None) for l in locals_]
  sent = jax.tree.map(lambda a, b: jnp.stack([a, b]), ups[0].sent, ups[1].sent)
  p = jnp.array([0.3, 0.7])
  new = method.aggregate(glob, sent, sent, p)
  for layer in ("q", "v"):
    recon = []
    for l in locals_:
      u, s, vt = np.linalg.svd(np.asarray(l[layer]["B"] @ l[layer]["A"]), full_matrices=False)
      recon.append((u[:, :2] * s[:2]) @ vt[:2])  # top m = ceil(0.5 * 4) = 2 triplets
    mean = 0.3 * recon[0] + 0.7 * recon[1]
    u, s, vt = np.linalg.svd(mean, full_matrices=False)
    best = (u[:, :R] * s[:R]) @ vt[:R]
    np.testing.assert_allclose(new[layer]["B"] @ new[layer]["A"], best, atol=1e-4)


def test_soft_with_everything_kept_equals_dense():
  apply_fn, frozen, state, data = support.tiny_setup()
  clients = jnp.array([0, 1, 3], jnp.int32)
  hp = fl_types.make_hparams(0.05, zeta=0.0, keep_ratio=1.0)
  results = {}
  for name in ("dense", "soft"):
    method = sparsifiers.make_sparsifier(name)
    st = fl_types.init_state(state.trainable.lora, state.trainable.head, 4,
                              method.error_feedback)
    round_fn = round_lib.make_round(apply_fn, optimizer="sgd", local_steps=2, batch_size=4,
                                    client_parallelism=1, sparsifier=method)
    results[name] = jax.jit(round_fn)(st, frozen, data, clients, jax.random.key(0), hp)
  chex.assert_trees_all_close(results["dense"][0].trainable, results["soft"][0].trainable,
                              atol=1e-6)
  np.testing.assert_array_equal(results["dense"][1].client_bits, results["soft"][1].client_bits)


@pytest.mark.parametrize("name", sparsifiers.METHODS)
def test_every_method_runs_in_the_round_without_recompiling_for_new_o(name):
  apply_fn, frozen, state, data = support.tiny_setup()
  method = sparsifiers.make_sparsifier(name)
  st = fl_types.init_state(state.trainable.lora, state.trainable.head, 4, method.error_feedback)
  traces = collections.Counter()
  round_fn = round_lib.make_round(apply_fn, optimizer="sgd", local_steps=2, batch_size=4,
                                  client_parallelism=1, sparsifier=method, value_bits=32,
                                  head_params=16 * 5 + 5)

  def counted(*args):
    traces["n"] += 1
    return round_fn(*args)

  step = jax.jit(counted)
  bits = []
  for t, o in enumerate([1.0, 0.5, 0.25]):
    hp = fl_types.make_hparams(0.05, zeta=0.1, keep_ratio=o)
    st, m = step(st, frozen, data, schedule.sample_clients(0, t, 4, 2), jax.random.key(0), hp)
    bits.append(int(m.client_bits.sum()))
    assert np.isfinite(float(m.train_loss)) and np.isfinite(float(m.cov_term))
  assert traces["n"] == 1
  if name == "dense":
    assert bits[0] == bits[1] == bits[2]
  else:
    assert bits[0] > bits[1] > bits[2]
  if method.error_feedback:
    # Residuals of the sampled clients were written back; unsampled ones stay zero.
    norms = np.asarray(sum(jnp.abs(r).reshape(4, -1).sum(1) for r in jax.tree.leaves(st.residuals)))
    assert (norms > 0).any()


def test_orthogonality_penalty_enters_the_local_objective():
  """With zeta > 0 the factors after a round are more orthogonal than with zeta = 0."""
  apply_fn, frozen, state, data = support.tiny_setup()
  method = sparsifiers.make_sparsifier("dense")
  round_fn = jax.jit(round_lib.make_round(apply_fn, optimizer="sgd", local_steps=5,
                                          batch_size=4, client_parallelism=1,
                                          sparsifier=method))
  res = {}
  for zeta in (0.0, 5.0):
    st = fl_types.init_state(state.trainable.lora, state.trainable.head, 4, False)
    _, m = round_fn(st, frozen, data, jnp.array([0, 1], jnp.int32), jax.random.key(0),
                    fl_types.make_hparams(0.05, zeta=zeta))
    res[zeta] = float(np.asarray(m.orth_residual)[1])  # rows of A
  assert res[5.0] < res[0.0]
