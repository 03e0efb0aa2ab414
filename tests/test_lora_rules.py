"""softjax/federated/lora_rules.py: every rule against a hand-computed two- or three-client
result, and aggregation_error against the dense products it avoids forming."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softjax.federated import lora_rules as rules

HALF = jnp.array([0.5, 0.5])
# Two rank-1 clients on a 2 x 2 layer whose products are the two diagonal units:
# sum_k p_k B_k A_k = I / 2, while separate averaging gives Bbar Abar = ones / 4.
B_DIAG = jnp.array([[[1.0], [0.0]], [[0.0], [1.0]]])  # [K=2, d_out=2, r=1]
A_DIAG = jnp.array([[[1.0, 0.0]], [[0.0, 1.0]]])  # [K=2, r=1, d_in=2]


def _fold(result):
  return result.fold_left @ result.fold_right


def test_fedit_by_hand_two_and_three_clients():
  out = rules.fedit(B_DIAG, A_DIAG, HALF)
  chex.assert_trees_all_close(out.B, jnp.array([[0.5], [0.5]]))
  chex.assert_trees_all_close(out.A, jnp.array([[0.5, 0.5]]))
  assert out.fold_left is None
  # The covariance term: I/2 - ones/4 = [[.25, -.25], [-.25, .25]], Frobenius norm 0.5.
  assert float(rules.aggregation_error(B_DIAG, A_DIAG, HALF, out)) == pytest.approx(0.5)
  # Three clients, p = (1/2, 1/4, 1/4): 0.5 * 2 + 0.25 * 0 + 0.25 * 4 = 2; 0 + 1 + 1 = 2.
  b3 = jnp.array([[[2.0], [0.0]], [[0.0], [4.0]], [[4.0], [4.0]]])
  a3 = jnp.ones((3, 1, 2))
  out3 = rules.fedit(b3, a3, jnp.array([0.5, 0.25, 0.25]))
  chex.assert_trees_all_close(out3.B, jnp.array([[2.0], [2.0]]))
  chex.assert_trees_all_close(out3.A, jnp.ones((1, 2)))


def test_fedex_folds_exactly_the_covariance_term():
  out = rules.fedex(B_DIAG, A_DIAG, HALF)
  chex.assert_trees_all_close(out.B, jnp.array([[0.5], [0.5]]))
  chex.assert_shape(out.fold_left, (2, 3))  # K r + r columns: sent factored
  chex.assert_trees_all_close(_fold(out), jnp.array([[0.25, -0.25], [-0.25, 0.25]]), atol=1e-6)
  assert float(rules.aggregation_error(B_DIAG, A_DIAG, HALF, out)) == pytest.approx(0.0, abs=1e-6)


def test_flora_folds_the_mean_product_and_restarts_the_adapter():
  fresh = jnp.array([[3.0, -1.0]])
  out = rules.flora(B_DIAG, A_DIAG, HALF, fresh)
  chex.assert_trees_all_close(_fold(out), 0.5 * jnp.eye(2))
  chex.assert_trees_all_close(out.B, jnp.zeros((2, 1)))
  chex.assert_trees_all_close(out.A, fresh)
  assert float(rules.aggregation_error(B_DIAG, A_DIAG, HALF, out)) == pytest.approx(0.0, abs=1e-6)


def test_flexlora_truncates_the_mean_product():
  # I/2 has two singular values 0.5: rank 1 keeps one, so it leaves 0.5; rank 2 is exact.
  one = rules.flexlora(B_DIAG, A_DIAG, HALF, rank=1)
  chex.assert_shape((one.B, one.A), ((2, 1), (1, 2)))
  assert float(jnp.linalg.norm(one.B @ one.A)) == pytest.approx(0.5, abs=1e-6)
  chex.assert_trees_all_close(one.A @ one.A.T, jnp.eye(1), atol=1e-6)
  assert float(rules.aggregation_error(B_DIAG, A_DIAG, HALF, one)) == pytest.approx(0.5, abs=1e-6)
  two = rules.flexlora(B_DIAG, A_DIAG, HALF, rank=2)
  chex.assert_trees_all_close(two.B @ two.A, 0.5 * jnp.eye(2), atol=1e-6)
  # More components than the clients sent: the extra ones are zero.
  three = rules.flexlora(B_DIAG, A_DIAG, HALF, rank=3)
  chex.assert_shape((three.B, three.A), ((2, 3), (3, 2)))
  chex.assert_trees_all_close(three.B @ three.A, 0.5 * jnp.eye(2), atol=1e-6)


def test_ffa_and_rolora_average_only_the_trained_factor():
  shared_a = jnp.broadcast_to(jnp.array([[1.0, 0.0]]), (2, 1, 2))
  out = rules.ffa(B_DIAG, shared_a, HALF)
  chex.assert_trees_all_close((out.B, out.A), (jnp.array([[0.5], [0.5]]), shared_a[0]))
  # A shared: the mean of the products is Bbar A exactly.
  assert float(rules.aggregation_error(B_DIAG, shared_a, HALF, out)) == pytest.approx(0.0)
  b_round = rules.rolora(B_DIAG, shared_a, HALF, jnp.array(True))
  chex.assert_trees_all_close((b_round.B, b_round.A), (out.B, out.A))
  shared_b = jnp.broadcast_to(jnp.array([[2.0], [0.0]]), (2, 2, 1))
  a_round = rules.rolora(shared_b, A_DIAG, HALF, jnp.array(False))
  chex.assert_trees_all_close((a_round.B, a_round.A),
                              (shared_b[0], jnp.array([[0.5, 0.5]])))
  assert float(rules.aggregation_error(shared_b, A_DIAG, HALF, a_round)) == pytest.approx(0.0)


def test_fedsa_keeps_each_clients_b():
  out = rules.fedsa(B_DIAG, A_DIAG, HALF)
  chex.assert_trees_all_close((out.B, out.A), (B_DIAG, jnp.array([[0.5, 0.5]])))
  # Clients next hold B_k Abar: sum_k p_k B_k Abar = ones / 4, so 0.5 is left, as for FedIT.
  assert float(rules.aggregation_error(B_DIAG, A_DIAG, HALF, out)) == pytest.approx(0.5)


def test_fedsvd_refactorizes_with_orthonormal_a():
  # A = 2 (0.6, 0.8) shared; Bbar = (0.5, 1): Bbar A = [[.6, .8], [1.2, 1.6]], one singular
  # value |Bbar| |A| = sqrt(1.25) * 2.
  a = jnp.broadcast_to(jnp.array([[1.2, 1.6]]), (2, 1, 2))
  b = jnp.array([[[1.0], [0.0]], [[0.0], [2.0]]])
  out = rules.fedsvd(b, a, HALF)
  chex.assert_trees_all_close(out.B @ out.A, jnp.array([[0.6, 0.8], [1.2, 1.6]]), atol=1e-6)
  chex.assert_trees_all_close(out.A @ out.A.T, jnp.eye(1), atol=1e-6)
  assert float(jnp.linalg.norm(out.B)) == pytest.approx(2.0 * 1.25 ** 0.5, abs=1e-5)
  assert float(rules.aggregation_error(b, a, HALF, out)) == pytest.approx(0.0, abs=1e-5)


def test_hetlora_pads_averages_and_truncates():
  b, a = jnp.ones((2, 2, 2)), jnp.ones((2, 2, 2))
  out = rules.hetlora(b, a, HALF, jnp.array([1, 2]))
  # Client 0 has rank 1: its second column of B and row of A count as zero.
  chex.assert_trees_all_close(out.B, jnp.array([[1.0, 0.5], [1.0, 0.5]]))
  chex.assert_trees_all_close(out.A, jnp.array([[1.0, 1.0], [0.5, 0.5]]))
  keep = rules.client_rank_keep((2, 1), jnp.int32(3), 2)  # client 3: ranks[3 mod 2] = 1
  chex.assert_trees_all_equal(keep, jnp.array([1.0, 0.0]))
  low = rules.truncated({"q": {"A": out.A, "B": out.B}}, keep)["q"]
  chex.assert_trees_all_close((low["B"], low["A"]), (jnp.array([[1.0, 0.0], [1.0, 0.0]]),
                                                     jnp.array([[1.0, 1.0], [0.0, 0.0]])))


@pytest.mark.parametrize("name", ["fedit", "fedex", "flora", "flexlora", "fedsvd", "fedsa"])
def test_aggregation_error_matches_dense_products(name):
  kb, ka, kf = jax.random.split(jax.random.PRNGKey(0), 3)
  k, d_out, d_in, r = 3, 6, 5, 2
  b = jax.random.normal(kb, (k, d_out, r))
  a = jax.random.normal(ka, (k, r, d_in))
  if name == "fedsvd":
    a = jnp.broadcast_to(a[0], a.shape)
  p = jnp.array([0.2, 0.3, 0.5])
  extra = {"flora": (jax.random.normal(kf, (r, d_in)),), "flexlora": (r,)}.get(name, ())
  out = getattr(rules, name)(b, a, p, *extra)
  ideal = np.einsum("k,kor,krd->od", p, b, a)
  held = (np.einsum("k,kor,rd->od", p, out.B, out.A) if out.B.ndim == 3
          else np.asarray(out.B @ out.A))
  if out.fold_left is not None:
    held = held + np.asarray(_fold(out))
  expected = np.linalg.norm(ideal - held)
  assert float(rules.aggregation_error(b, a, p, out)) == pytest.approx(expected, abs=1e-4)
  if name == "flexlora":  # Eckart-Young: the error is the dropped singular values' norm
    s = np.linalg.svd(ideal, compute_uv=False)
    assert expected == pytest.approx(np.sqrt(np.sum(s[r:] ** 2)), abs=1e-4)


# ------------------------------------------------------------------ the rules inside the round


TINY_SCALE = 4.0 / 4  # tiny_setup's alpha / r


HET_RANKS = (4, 1, 2)  # HetLoRA's client ranks in the round tests: client k gets HET_RANKS[k % 3]


def _round(rule, state=None, clients=(1, 3), lr=0.05, steps=2, parallelism=1):
  from softjax.federated import round as round_lib
  from softjax.federated import types as fl_types
  from tests.support import tiny_setup

  apply_fn, frozen, init, data = tiny_setup()
  round_fn = jax.jit(round_lib.make_round(
      apply_fn, optimizer="sgd", local_steps=steps, batch_size=4,
      client_parallelism=parallelism, rule=rule, adapter_scale=TINY_SCALE,
      client_ranks=HET_RANKS if rule == "hetlora" else ()))
  if rule in ("fedsa", "fedex", "flora"):  # FedSA: every client's own B; the others: folds
    init = fl_types.init_state(init.trainable.lora, init.trainable.head, num_clients=4,
                               error_feedback=False, personal_b=rule == "fedsa",
                               fold=rule in ("fedex", "flora"))
  state = init if state is None else state
  new, metrics = round_fn(state, frozen, data, jnp.array(clients, jnp.int32), jax.random.key(2),
                          fl_types.make_hparams(lr))
  return new, metrics, state, (apply_fn, frozen, data)


def _client_factors(state, setup, clients, mask, lr=0.05, steps=2):
  """Per client its trained LoRA tree (a loop of client updates with the rule's mask)."""
  from softjax.federated import client as client_lib
  from softjax.federated import types as fl_types

  apply_fn, frozen, data = setup
  update = jax.jit(client_lib.make_client_update(apply_fn, optimizer="sgd", local_steps=steps,
                                                batch_size=4))
  hp = fl_types.make_hparams(lr)._replace(factor_mask=mask)
  round_key = jax.random.fold_in(jax.random.key(2), state.round)
  local = [update(state.trainable, frozen, data, jnp.int32(k), jax.random.fold_in(round_key, k),
                  hp)[0].lora for k in clients]
  counts = np.asarray(data.counts)[list(clients)].astype(np.float64)
  return local, counts / counts.sum()


def _pairs(tree):
  from softjax.models import lora as lora_lib
  return lora_lib.factor_pairs(tree)[0]


def test_ffa_round_freezes_a_and_averages_b_over_a_client_loop():
  new, metrics, state, setup = _round("ffa")
  local, p = _client_factors(state, setup, (1, 3), jnp.array([1.0, 0.0]))
  for g, n, *ks in zip(_pairs(state.trainable.lora), _pairs(new.trainable.lora),
                       *map(_pairs, local)):
    chex.assert_trees_all_equal(n["A"], g["A"])  # frozen: not trained, not changed
    chex.assert_trees_all_close(n["B"], sum(pk * k["B"] for pk, k in zip(p, ks)), atol=1e-6)
  assert float(metrics.cov_term) == pytest.approx(0.0, abs=1e-4)  # A shared: exact average
  # Only B (and the head) is uploaded.
  b_values = sum(q["B"].size for q in _pairs(state.trainable.lora))
  _, dense, *_ = _round("fedit")
  a_values = sum(q["A"].size for q in _pairs(state.trainable.lora))
  chex.assert_trees_all_equal(metrics.client_bits, dense.client_bits - 32 * a_values)
  assert b_values > 0


def test_rolora_trains_b_then_a():
  first, _, state, _ = _round("rolora")
  second, _, _, _ = _round("rolora", state=first, clients=(0, 2))
  for g, one, two in zip(*(map(_pairs, (state.trainable.lora, first.trainable.lora,
                                        second.trainable.lora)))):
    chex.assert_trees_all_equal(one["A"], g["A"])  # round 0: B trained
    assert float(jnp.abs(one["B"] - g["B"]).max()) > 0
    chex.assert_trees_all_equal(two["B"], one["B"])  # round 1: A trained
    assert float(jnp.abs(two["A"] - one["A"]).max()) > 0


def test_fedsvd_round_keeps_ffas_product_with_orthonormal_a():
  svd, metrics, state, _ = _round("fedsvd")
  ffa, *_ = _round("ffa")
  for s, f in zip(_pairs(svd.trainable.lora), _pairs(ffa.trainable.lora)):
    chex.assert_trees_all_close(s["B"] @ s["A"], f["B"] @ f["A"], atol=1e-5)
    r = s["A"].shape[0]
    chex.assert_trees_all_close(s["A"] @ s["A"].T, jnp.eye(r), atol=1e-5)
  assert float(metrics.cov_term) == pytest.approx(0.0, abs=1e-4)


def test_flexlora_round_is_the_truncated_svd_of_the_mean_product():
  new, metrics, state, setup = _round("flexlora")
  local, p = _client_factors(state, setup, (1, 3), jnp.ones((2,)))
  dropped = 0.0
  for n, *ks in zip(_pairs(new.trainable.lora), *map(_pairs, local)):
    mean = sum(pk * np.asarray(k["B"] @ k["A"], np.float64) for pk, k in zip(p, ks))
    u, s, vt = np.linalg.svd(mean)
    r = n["B"].shape[1]
    np.testing.assert_allclose(n["B"] @ n["A"], (u[:, :r] * s[:r]) @ vt[:r], atol=1e-5)
    dropped += np.sqrt(np.sum(s[r:] ** 2))
  # The reported error is each layer's Eckart-Young residual, summed over layers.
  assert float(metrics.cov_term) == pytest.approx(dropped, rel=1e-3, abs=1e-6)


def test_fedsa_round_keeps_each_clients_b_and_averages_a_over_a_client_loop():
  from softjax.federated import client as client_lib
  from softjax.federated import types as fl_types
  from softjax.models import lora as lora_lib

  first, _, init, (apply_fn, frozen, data) = _round("fedsa")
  second, metrics, _, _ = _round("fedsa", state=first, clients=(0, 1))
  update = jax.jit(client_lib.make_client_update(apply_fn, optimizer="sgd", local_steps=2,
                                                batch_size=4))
  # The reference: each client starts from the shared A and its own B; A and the head are
  # averaged by data size; B_k stays with client k; the global B is the mean of all four.
  glob = init.trainable
  own = {k: lora_lib.b_factors(glob.lora) for k in range(4)}
  for t, clients in enumerate(((1, 3), (0, 1))):
    round_key = jax.random.fold_in(jax.random.key(2), t)
    counts = np.asarray(data.counts)[list(clients)].astype(np.float64)
    p = counts / counts.sum()
    locals_ = []
    for k in clients:
      start = glob._replace(lora=lora_lib.with_b_factors(glob.lora, own[k]))
      local, _ = update(start, frozen, data, jnp.int32(k), jax.random.fold_in(round_key, k),
                        fl_types.make_hparams(0.05))
      locals_.append(local)
      own[k] = lora_lib.b_factors(local.lora)
    averaged = jax.tree.map(lambda *xs: sum(pk * x for pk, x in zip(p, xs)), *locals_)
    mean_b = jax.tree.map(lambda *bs: sum(bs) / 4, *own.values())
    glob = fl_types.Trainable(lora=lora_lib.with_b_factors(averaged.lora, mean_b),
                              head=averaged.head)
  chex.assert_trees_all_close(second.trainable, glob, atol=1e-6)
  for k in range(4):
    chex.assert_trees_all_close(jax.tree.map(lambda b: b[k], second.client_factors), own[k],
                                atol=1e-6)
  assert float(jnp.abs(jax.tree.leaves(own[1])[0] - jax.tree.leaves(own[3])[0]).max()) > 0
  # B never leaves the client: the upload is A and the head.
  _, dense, *_ = _round("fedit", clients=(0, 1))
  b_values = sum(q["B"].size for q in _pairs(init.trainable.lora))
  chex.assert_trees_all_equal(metrics.client_bits, dense.client_bits - 32 * b_values)
  assert float(metrics.cov_term) > 0  # personal B: the mean model is not the mean product


@pytest.mark.parametrize("parallelism", [1, 2], ids=["sequential", "vmapped"])
def test_hetlora_round_trains_each_client_at_its_rank_over_a_client_loop(parallelism):
  from softjax.federated import client as client_lib
  from softjax.federated import types as fl_types

  first, _, init, (apply_fn, frozen, data) = _round("hetlora", parallelism=parallelism)
  second, metrics, _, _ = _round("hetlora", state=first, clients=(0, 1),
                                 parallelism=parallelism)
  update = jax.jit(client_lib.make_client_update(apply_fn, optimizer="sgd", local_steps=2,
                                                batch_size=4))
  # The reference: client k trains the global factors truncated to its rank with the gradients
  # beyond it masked; the server averages the zero-padded factors (rules.hetlora) and the heads.
  glob = init.trainable
  r = _pairs(glob.lora)[0]["B"].shape[1]
  for t, clients in enumerate(((1, 3), (0, 1))):
    round_key = jax.random.fold_in(jax.random.key(2), t)
    counts = np.asarray(data.counts)[list(clients)].astype(np.float64)
    p = jnp.asarray(counts / counts.sum(), jnp.float32)
    ranks = jnp.array([HET_RANKS[k % 3] for k in clients])
    locals_ = []
    for k, rank in zip(clients, ranks):
      keep = (jnp.arange(r) < rank).astype(jnp.float32)
      start = glob._replace(lora=jax.tree.map(
          lambda pair: {"A": pair["A"] * keep[:, None], "B": pair["B"] * keep[None, :]},
          glob.lora, is_leaf=lambda n: isinstance(n, dict) and set(n) == {"A", "B"}))
      hp = fl_types.make_hparams(0.05)._replace(factor_mask=jnp.stack([keep, keep]))
      local, _ = update(start, frozen, data, jnp.int32(k), jax.random.fold_in(round_key, k), hp)
      for q in _pairs(local.lora):  # nothing trained beyond the client's rank
        assert float(jnp.abs(q["B"][:, int(rank):]).max(initial=0.0)) == 0.0
        assert float(jnp.abs(q["A"][int(rank):]).max(initial=0.0)) == 0.0
      locals_.append(local)
    layers = [rules.hetlora(jnp.stack([q["B"] for q in ks]), jnp.stack([q["A"] for q in ks]),
                            p, ranks) for ks in zip(*(_pairs(x.lora) for x in locals_))]
    want_error = sum(float(rules.aggregation_error(jnp.stack([q["B"] for q in ks]),
                                                   jnp.stack([q["A"] for q in ks]), p, out))
                     for ks, out in zip(zip(*(_pairs(x.lora) for x in locals_)), layers))
    lora = jax.tree.unflatten(jax.tree.structure(glob.lora, is_leaf=lambda n: isinstance(
        n, dict) and set(n) == {"A", "B"}), [{"A": o.A, "B": o.B} for o in layers])
    head = jax.tree.map(lambda *hs: sum(pk * h for pk, h in zip(p, hs)),
                        *[x.head for x in locals_])
    glob = fl_types.Trainable(lora=lora, head=head)
  chex.assert_trees_all_close(second.trainable, glob, atol=1e-6)
  # Ranks 4 and 1 this round: the rank-1 client sends 1 of r components' values of B and A.
  _, dense, *_ = _round("fedit", state=first, clients=(0, 1))
  per_component = sum(q["B"].shape[0] + q["A"].shape[1] for q in _pairs(init.trainable.lora))
  chex.assert_trees_all_equal(metrics.client_bits, dense.client_bits
                              - 32 * jnp.array([0, (r - 1) * per_component]))
  # The error left is the covariance term of the padded factors (the rank-1 client's missing
  # components count as zero in the average).
  assert float(metrics.cov_term) == pytest.approx(want_error, rel=1e-4)
  assert want_error > 0


def test_component_values_by_hand_on_a_non_square_layer():
  dims = [(3, 5)]  # (d_in, d_out): a column of B costs 5, a row of A 3
  assert [rules.component_values(rule, dims) for rule in ("fedit", "ffa", "fedsa")] == [8, 5, 3]
  assert [rules.component_values("rolora", dims, t) for t in (0, 1, None)] == [5, 3, 5]
  # HetLoRA clients 0, 1, 2 at ranks 2, 1, 2 (ranks dealt by id), a 10-value head, q = 16.
  np.testing.assert_array_equal(
      rules.upload_bits("hetlora", dims, 2, 0, np.array([0, 1, 2]), (2, 1), value_bits=16,
                        head_params=10), 16 * np.array([26, 18, 26]))


@pytest.mark.parametrize("rule", ["ffa", "fedsa", "rolora", "hetlora"])
def test_the_controllers_bits_of_a_rule_equal_what_the_round_counts(rule):
  # lora_rules.upload_bits prices a dense upload under a rule for the controller, on the host.
  first, metrics, init, _ = _round(rule)
  dims = [(q["A"].shape[1], q["B"].shape[0]) for q in _pairs(init.trainable.lora)]
  r = _pairs(init.trainable.lora)[0]["B"].shape[1]
  price = lambda t, clients: rules.upload_bits(  # noqa: E731
      rule, dims, r, t, np.array(clients), HET_RANKS if rule == "hetlora" else (),
      value_bits=32, head_params=0)  # the tiny round sends no head values (head_params=0)
  np.testing.assert_array_equal(np.asarray(metrics.client_bits), price(0, (1, 3)))
  if rule in ("rolora", "hetlora"):  # A's round; other clients' ranks
    _, later, *_ = _round(rule, state=first, clients=(0, 2))
    np.testing.assert_array_equal(np.asarray(later.client_bits), price(1, (0, 2)))


def test_a_fold_in_the_frozen_kernels_is_the_adapter_product():
  from softjax.models import lora as lora_lib
  from tests.support import tiny_setup

  apply_fn, frozen, state, _ = tiny_setup()
  lora = jax.tree.map(lambda x: x + 0.3 * jnp.sign(x), state.trainable.lora)
  folds = jax.tree.map(lambda pair: {"W": pair["B"] @ pair["A"]}, lora,
                       is_leaf=lora_lib.is_factor_pair)
  no_adapter = jax.tree.map(lambda pair: {"A": pair["A"], "B": 0 * pair["B"]}, lora,
                            is_leaf=lora_lib.is_factor_pair)
  x = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
  want = apply_fn(frozen, state.trainable._replace(lora=lora), x)
  got = apply_fn(lora_lib.fold_into(frozen, folds, TINY_SCALE),
                 state.trainable._replace(lora=no_adapter), x)
  chex.assert_trees_all_close(got, want, atol=1e-5)
  assert lora_lib.fold_into(frozen, (), TINY_SCALE) is frozen
  # The evaluation scores the folded model too.
  from softjax.data import batching
  from softjax.federated import evaluation
  eval_fn = jax.jit(evaluation.make_eval(apply_fn, 4, TINY_SCALE))
  images = np.random.default_rng(0).integers(0, 256, (8, 8, 8, 1), dtype=np.uint8)
  labels, masks = np.arange(8, dtype=np.int32) % 5, np.ones((1, 8), np.float32)
  logits = apply_fn(frozen, state.trainable._replace(lora=lora),
                    batching.preprocess(jnp.asarray(images)))
  hits = float(np.sum(np.argmax(logits, -1) == labels))
  got, _ = eval_fn(frozen, folds, state.trainable._replace(lora=no_adapter), images, labels, masks)
  assert float(got[0]) == hits
  zeros = lora_lib.zero_folds(lora)
  chex.assert_shape(jax.tree.leaves(zeros)[0], (16, 16))  # [d_out, d_in] of query (2 x 8 heads)


def _folding_reference(rule, init, setup, lr, rounds=((1, 3), (0, 1))):
  """(trainable, folds) after `rounds` of a folding rule, as a loop of client updates: clients
  train on frozen + folds; FedEx-LoRA folds sum p_k B_k A_k - Bbar Abar and keeps the averages,
  FLoRA folds sum p_k B_k A_k and restarts the adapter (B = 0, a fresh A); heads averaged."""
  from softjax.federated import client as client_lib
  from softjax.federated import round as round_lib
  from softjax.federated import types as fl_types
  from softjax.models import lora as lora_lib

  apply_fn, frozen, data = setup
  update = jax.jit(client_lib.make_client_update(apply_fn, optimizer="sgd", local_steps=2,
                                                batch_size=4))
  is_leaf = lambda n: lora_lib.is_factor_pair(n) or set(n) == {"W"}  # noqa: E731
  glob, folds = init.trainable, lora_lib.zero_folds(init.trainable.lora)
  for t, clients in enumerate(rounds):
    round_key = jax.random.fold_in(jax.random.key(2), t)
    counts = np.asarray(data.counts)[list(clients)].astype(np.float64)
    p = counts / counts.sum()
    frozen_now = lora_lib.fold_into(frozen, folds, TINY_SCALE)
    locals_ = [update(glob, frozen_now, data, jnp.int32(k), jax.random.fold_in(round_key, k),
                      fl_types.make_hparams(lr))[0] for k in clients]
    mean = jax.tree.map(lambda *xs: sum(pk * x for pk, x in zip(p, xs)), *locals_)
    held = mean.lora if rule == "fedex" else rules.restarted(
        glob.lora, jax.random.fold_in(round_key, round_lib.RESTART_STREAM))
    folds = jax.tree.map(
        lambda f, h, *pairs: {"W": f["W"] + sum(pk * q["B"] @ q["A"] for pk, q in zip(p, pairs))
                              - h["B"] @ h["A"]},
        folds, held, *[x.lora for x in locals_], is_leaf=is_leaf)
    glob = fl_types.Trainable(lora=held, head=mean.head)
  return glob, folds


def _fold_columns_bits(lora, columns):
  """Bits of a factored fold of `columns` r-column blocks a layer, at 32 bits a value."""
  per_block = sum((q["B"].shape[0] + q["A"].shape[1]) * q["B"].shape[1] for q in _pairs(lora))
  return 32 * columns * per_block


def test_fedex_round_folds_the_exact_residual_over_a_client_loop():
  lr = 0.5  # clients that move apart, so that the residual (up to 0.2 here) is far above rounding
  first, _, init, setup = _round("fedex", lr=lr)
  second, metrics, _, _ = _round("fedex", state=first, clients=(0, 1), lr=lr)
  glob, folds = _folding_reference("fedex", init, setup, lr)
  chex.assert_trees_all_close(second.trainable, glob, atol=1e-6)
  chex.assert_trees_all_close(second.folded, folds, atol=1e-6)
  assert float(jnp.abs(jax.tree.leaves(folds)[0]).max()) > 1e-4  # a real residual was folded
  # Nothing of the clients' mean product is lost; FedIT's same round leaves its covariance term.
  _, fedit_metrics, *_ = _round("fedit", state=first._replace(folded=()), clients=(0, 1),
                                lr=lr)
  assert float(metrics.cov_term) < 1e-3 * float(fedit_metrics.cov_term)
  # The fold is broadcast as [p_1 B_1 | p_2 B_2 | -Bbar] [A_1; A_2; Abar]: 3 r columns a layer.
  assert int(metrics.downlink_bits) == _fold_columns_bits(init.trainable.lora, 3)
  assert int(fedit_metrics.downlink_bits) == 0


def test_flora_round_folds_the_mean_product_and_restarts_the_adapter_over_a_client_loop():
  lr = 0.5
  first, _, init, setup = _round("flora", lr=lr)
  second, metrics, _, _ = _round("flora", state=first, clients=(0, 1), lr=lr)
  glob, folds = _folding_reference("flora", init, setup, lr)
  chex.assert_trees_all_close(second.trainable, glob, atol=1e-6)
  chex.assert_trees_all_close(second.folded, folds, atol=1e-6)
  for old, new in zip(_pairs(first.trainable.lora), _pairs(second.trainable.lora)):
    assert float(jnp.abs(new["B"]).max()) == 0.0  # restarted
    assert float(jnp.abs(new["A"] - old["A"]).max()) > 0.1  # a fresh A each round
    chex.assert_trees_all_close(float(jnp.std(new["A"]) * np.sqrt(new["A"].shape[1])), 1.0,
                                rtol=0.35)
  assert float(metrics.cov_term) < 1e-4  # the fold is the exact mean product
  # The fold is broadcast as [p_1 B_1 | p_2 B_2] [A_1; A_2]: 2 r columns a layer.
  assert int(metrics.downlink_bits) == _fold_columns_bits(init.trainable.lora, 2)


@pytest.mark.parametrize("overrides, line", [
    ({"method.rule": "ffa", "method.name": "soft", "method.keep_ratio": 0.5},
     "method.rule.*ffa.*method.name=soft.*needs method.name=dense"),
    ({"method.rule": "hetlora", "method.client_ranks": "2,8", "controller.name": "tsfa",
      "method.name": "dense"}, "method.rule.*hetlora.*controller.name=tsfa.*fixed or osfa"),
    ({"method.rule": "flexlora", "server.optimizer": "fedadam"},
     "method.rule.*server.optimizer=fedadam"),
    ({"method.rule": "fedsa", "server.optimizer": "fedyogi"},
     "method.rule.*fedsa.*server.optimizer=fedyogi"),
    ({"method.rule": "fedex", "server.optimizer": "fedavgm"},
     "method.rule.*fedex.*server.optimizer=fedavgm"),
    ({"method.rule": "flora", "server.optimizer": "fedadam"},
     "method.rule.*flora.*server.optimizer=fedadam"),
    ({"method.rule": "hetlora"}, "method.client_ranks.*with method.rule = 'hetlora'"),
    ({"method.rule": "fedit", "method.client_ranks": "2,4"},
     "method.client_ranks.*'' with any other rule.*'fedit'"),
    ({"method.rule": "hetlora", "method.client_ranks": "2,16"},
     r"method.client_ranks.*ranks in \[1, lora.rank = 8\]"),
    ({"method.rule": "hetlora", "method.client_ranks": "two"}, "method.client_ranks"),
    ({"method.rule": "hetlora", "method.client_ranks": "2,8", "method.name": "soft"},
     "method.rule.*hetlora.*method.name=soft"),
])
def test_rule_combinations_it_cannot_run_are_refused(overrides, line):
  from softjax import config as config_lib
  from softjax import errors
  from tests.support import quickstart_with

  with pytest.raises(errors.ConfigError, match=line):
    config_lib.validate(quickstart_with(overrides))


@pytest.mark.slow
def test_fedex_folds_are_checkpointed_and_a_resumed_sweep_equals_the_straight_run(cache_dir,
                                                                                  tmp_path):
  from softjax.run import experiment
  from tests.support import make_config

  common = {"method.rule": "fedex", "checkpoint.every": 2, "sweep.seed": "0,1"}
  run = lambda name, rounds: experiment.run(  # noqa: E731
      make_config(cache_dir, rounds=rounds, **common), str(tmp_path / name))
  straight = run("straight", 4)
  run("resumed", 2)
  resumed = run("resumed", 4)  # restores the folds from round 2's checkpoint
  fields = ("round", "member", "train_loss", "cov_term", "downlink_bits", "test_accuracy")
  pick = lambda rows: [tuple(r.get(f) for f in fields) for r in rows]  # noqa: E731
  assert pick(resumed["rows"]) == pick(straight["rows"])
  assert all(r["downlink_bits"] > 0 for r in straight["rows"])


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["rolora", "flexlora", "fedsa", "fedex", "flora", "hetlora"])
def test_a_rule_runs_end_to_end_with_one_compilation(cache_dir, tmp_path, rule):
  from softjax.run import experiment
  from tests.support import make_config

  ranks = {"method.client_ranks": "1,2"} if rule == "hetlora" else {}
  summary = experiment.run(make_config(cache_dir, **{"method.rule": rule}, **ranks),
                           str(tmp_path))
  assert summary["round_traces"] == 1  # RoLoRA's alternation is traced, not recompiled
  assert all(np.isfinite(r["train_loss"]) for r in summary["rows"])
  assert summary["final_accuracy"] is not None


@pytest.mark.slow
@pytest.mark.parametrize("rule, controller", [("ffa", "tsfa"), ("hetlora", "osfa")])
def test_a_rule_runs_under_a_latency_controller_that_prices_its_payload(cache_dir, tmp_path,
                                                                       rule, controller):
  # O = 1 every round; the split is the least-latency one for the rule's own per-client bits,
  # so with perfect CSI the round's latency is the one the controller predicted.
  from softjax.run import experiment
  from tests.support import make_config

  ranks = {"method.client_ranks": "1,4,2"} if rule == "hetlora" else {}
  summary = experiment.run(make_config(cache_dir, **{"method.rule": rule, "method.name": "dense",
                                                     "controller.name": controller}, **ranks),
                           str(tmp_path))
  assert summary["round_traces"] == 1
  for row in summary["rows"]:
    assert row["keep_ratio"] == 1.0 and row["solver"] in ("cvx", "numpy")
    assert row["latency_s"] == pytest.approx(row["predicted_latency_s"], rel=1e-4)
  assert len({r["uplink_bits"] for r in summary["rows"]}) > 1 or rule != "hetlora"
