"""Per-client state in host memory, so that device memory grows with K, not with N.

Error-feedback residuals (ALGORITHM.md 2.4), SCAFFOLD's client controls and FedSA-LoRA's
per-client B exist for all N clients, but a round reads and writes only the K it samples. With `fl.client_store = "host"`
they live here as NumPy arrays [N, ...] (one store per sweep member). Before each round the
runner hands the round the sampled clients' rows ([K, ...] in sampling order, the round's
`host_store` layout) and afterwards writes the round's new rows back. The device holds K rows.

Re-orthogonalization (ALGORITHM.md 2.1) moves every stored residual into the new basis each
round: X_A -> H X_A, X_B -> X_B H^-1. On the device that is one einsum over all N rows. Here it
is lazy. The store keeps each round's bases and, per client, the round its row is expressed in
(`epoch`). A row is brought up to date only when it is next handed out or checkpointed, by the
composed map of the rounds it missed: X_A -> (H_{t-1} ... H_e) X_A and
X_B -> X_B (H_e^-1 ... H_{t-1}^-1). Those products are formed in float64 from the float32 bases,
so a lazy row equals the eagerly moved one up to float32 rounding, not bit for bit. A client
never written holds zeros, which every basis maps to zeros: it needs no epoch.

Bases are kept from the oldest epoch any stored row still needs. That is at most one [r, r]
pair per layer and round (6 KB a round for 12 rank-8 layers), whatever N is.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from softjax.models.lora import factor_pairs

PyTree = Any
NEVER = -1  # epoch of a residual row that was never written (all zeros)
# The per-client fields of federated.types.ServerState; only the residuals change basis.
FIELDS = ("residuals", "client_controls", "client_factors")


def fields_of(state) -> dict[str, PyTree]:
  """{field: tree} of a ServerState's per-client fields."""
  return {name: getattr(state, name) for name in FIELDS}


class MemberStore:
  """One run's (one sweep member's) per-client state of all N clients, on the host."""

  def __init__(self, parts: dict[str, PyTree], lazy_basis: bool):
    """`parts`: {field: tree of [N, ...] arrays} ({} or () where off), copied to NumPy;
    `lazy_basis`: the residuals follow the re-orthogonalization's bases."""
    self.parts = {name: jax.tree.map(np.array, parts.get(name, ())) for name in FIELDS}
    leaves = jax.tree.leaves(self.parts)
    self.num_clients = leaves[0].shape[0] if leaves else 0
    residuals = self.parts["residuals"]
    self.lazy_basis = lazy_basis and bool(jax.tree.leaves(residuals))
    # A restored or given store may hold non-zero rows: they are current as of `current`.
    self.epoch = np.full((self.num_clients,), NEVER, np.int64)
    self.current = 0  # the round whose basis the global factors are in
    self.bases: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}  # round -> [(H, H^-1)]
    if self.lazy_basis:
      written = np.zeros((self.num_clients,), bool)
      for leaf in jax.tree.leaves(residuals):
        written |= np.any(leaf.reshape(self.num_clients, -1) != 0, axis=1)
      self.epoch[written] = 0

  def start(self, round_index: int) -> None:
    """Sets the round the stored rows are expressed in (0 for a new run; the checkpoint's round
    after a restore, whose rows were saved up to date)."""
    self.epoch[self.epoch != NEVER] = round_index
    self.current = round_index

  def gather(self, ids: np.ndarray) -> dict[str, PyTree]:
    """{field: rows of clients `ids` [K], in that order}, residuals in the current basis.
    Copies: the store is not changed."""
    ids = np.asarray(ids)
    rows = {name: jax.tree.map(lambda leaf: leaf[ids], tree) for name, tree in self.parts.items()}
    if self.lazy_basis:
      self._move(rows["residuals"], self.epoch[ids])
    return rows

  def scatter(self, ids: np.ndarray, rows: dict[str, PyTree],
              bases: list | tuple = ()) -> None:
    """Writes back the round's rows of clients `ids` [K] ({field: tree}, residuals already in
    the new basis) and ends the round: records its change of basis, `bases` [(H, H^-1)] per
    layer (() if none)."""
    ids = np.asarray(ids)
    for name, tree in self.parts.items():
      jax.tree.map(lambda leaf, new: leaf.__setitem__(ids, np.asarray(new)), tree, rows[name])
    if self.lazy_basis:
      self.bases[self.current] = [(np.asarray(h, np.float64), np.asarray(h_inv, np.float64))
                                  for h, h_inv in bases]
      self.epoch[ids] = self.current + 1
    self.current += 1
    self._forget_unneeded_bases()

  def materialized(self) -> dict[str, PyTree]:
    """Every row brought up to the current basis, in place ({field: [N, ...] tree}, for a
    checkpoint); afterwards no basis is needed."""
    if self.lazy_basis:
      residuals = self.parts["residuals"]
      stale = np.flatnonzero((self.epoch != NEVER) & (self.epoch < self.current))
      if stale.size:
        rows = jax.tree.map(lambda leaf: leaf[stale], residuals)
        self._move(rows, self.epoch[stale])
        jax.tree.map(lambda leaf, r: leaf.__setitem__(stale, r), residuals, rows)
        self.epoch[stale] = self.current
      self._forget_unneeded_bases()
    return self.parts

  def nbytes(self) -> int:
    """Host bytes held: the rows and the kept bases."""
    rows = sum(x.nbytes for x in jax.tree.leaves(self.parts))
    return rows + sum(h.nbytes + g.nbytes for layers in self.bases.values() for h, g in layers)

  def _move(self, residuals: PyTree, epochs: np.ndarray) -> None:
    """Moves rows (in place) from the basis of round `epochs[j]` into the current one."""
    pairs, _ = factor_pairs(residuals)
    for epoch in np.unique(epochs):
      if epoch == NEVER or epoch == self.current:
        continue
      sel = np.flatnonzero(epochs == epoch)
      for layer, pair in enumerate(pairs):
        h, h_inv = self._composed(int(epoch), layer)
        a, b = pair["A"], pair["B"]
        a[sel] = np.einsum("rs,ksd->krd", h, a[sel]).astype(a.dtype)
        b[sel] = np.einsum("kor,rs->kos", b[sel], h_inv).astype(b.dtype)

  def _composed(self, epoch: int, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """(H_{t-1} ... H_epoch, H_epoch^-1 ... H_{t-1}^-1) of one layer, t the current round."""
    h, h_inv = self.bases[epoch][layer]
    for t in range(epoch + 1, self.current):
      step, step_inv = self.bases[t][layer]
      h, h_inv = step @ h, h_inv @ step_inv
    return h, h_inv

  def _forget_unneeded_bases(self) -> None:
    live = self.epoch[self.epoch != NEVER]
    oldest = int(live.min()) if live.size else self.current
    for t in [t for t in self.bases if t < oldest]:
      del self.bases[t]


def _pick(tree: PyTree, i: int) -> PyTree:
  return jax.tree.map(lambda x: x[i], tree)


class ClientStore:
  """The host store of a run: one MemberStore per sweep member (`swept`: the trees carry a
  leading [S] axis, as the round's state does)."""

  def __init__(self, parts: dict[str, PyTree], swept: bool, lazy_basis: bool):
    self.swept, self.lazy_basis = swept, lazy_basis
    if swept:
      leaves = jax.tree.leaves(parts)
      count = leaves[0].shape[0] if leaves else 0
      self.members = [MemberStore(_pick(parts, i), lazy_basis) for i in range(count)]
    else:
      self.members = [MemberStore(parts, lazy_basis)]

  @classmethod
  def initial(cls, parts: dict[str, PyTree], num_clients: int, swept: bool,
              lazy_basis: bool) -> "ClientStore":
    """A store of `num_clients` rows, each a copy of the first row of `parts` (a round-0
    state's [K, ...] fields, [S, K, ...] for a sweep, whose rows are all alike: zeros, or
    FedSA-LoRA's initial B)."""
    axis = 1 if swept else 0

    def repeat(x):
      first = np.take(np.asarray(x), [0], axis=axis)
      return np.repeat(first, num_clients, axis=axis)

    return cls(jax.tree.map(repeat, parts), swept, lazy_basis)

  def start(self, round_index: int) -> None:
    for member in self.members:
      member.start(round_index)

  def gather(self, ids: list[np.ndarray]) -> dict[str, PyTree]:
    """The rows of each member's sampled clients (`ids`: one [K] array per member), stacked
    over members for a sweep."""
    return self._stacked([m.gather(i) for m, i in zip(self.members, ids)])

  def scatter(self, ids: list[np.ndarray], rows: dict[str, PyTree], bases: PyTree = ()) -> None:
    """Writes the round's new rows ({field: device or host tree}, [S] leading for a sweep)."""
    rows, bases = jax.tree.map(np.asarray, (rows, bases))
    for i, (member, member_ids) in enumerate(zip(self.members, ids)):
      pick = (lambda tree: _pick(tree, i)) if self.swept else (lambda tree: tree)
      layers = [(b.H, b.H_inv) for b in pick(bases)] if bases else ()
      member.scatter(member_ids, pick(rows), layers)

  def materialized(self) -> dict[str, PyTree]:
    """All N rows of every member in the current basis ([S, N, ...] for a sweep)."""
    return self._stacked([m.materialized() for m in self.members])

  def nbytes(self) -> int:
    return sum(m.nbytes() for m in self.members)

  def _stacked(self, parts: list[dict[str, PyTree]]) -> dict[str, PyTree]:
    if not self.swept:
      return parts[0]
    return jax.tree.map(lambda *xs: np.stack(xs), *parts)
