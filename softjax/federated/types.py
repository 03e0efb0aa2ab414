"""The pytrees of a federated round: what clients train, the server state, the data, the links.

Leading-axis conventions: `[K, ...]` sampled clients, `[N, ...]` all clients, `[S, ...]` sweep
members.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from softjax.models import lora as lora_lib
from softjax.models.apply import ApplyFn  # noqa: F401  (the round's model type, re-exported)

PyTree = Any


class Trainable(NamedTuple):
  """What clients train and upload: LoRA factors and the classifier head."""
  lora: PyTree
  head: PyTree


class ServerState(NamedTuple):
  """The global model between rounds, and what clients keep between rounds."""
  trainable: Trainable
  round: jax.Array  # int32 [], rounds completed
  residuals: PyTree  # error-feedback residuals, LoRA structure with a leading [N] axis; {} if off
  server_opt: PyTree = ()  # the server optimizer's state over `trainable`; () for plain FedAvg
  control: PyTree = ()  # SCAFFOLD's server control variate c, shaped like `trainable`; () if off
  client_controls: PyTree = ()  # SCAFFOLD's c_k of all N clients, [N] + `trainable`; () if off
  # FedSA-LoRA's per-client B of all N clients, [N] + lora.b_factors(lora); () if off. The
  # global B in `trainable` is their mean (what the test set is scored with).
  client_factors: PyTree = ()
  # FedEx-LoRA's folded residuals: per adapted layer {"W": [d_out, d_in]} (lora.zero_folds),
  # added as alpha/r * W to that layer's frozen kernel (lora.fold_into); () if off.
  folded: PyTree = ()


class FederatedData(NamedTuple):
  """Device-resident federated training set with per-client padded index tables."""
  images: jax.Array  # uint8 [M, H, W, C]
  labels: jax.Array  # int32 [M]
  table: jax.Array  # int32 [N, max_n], padded; row k lists client k's examples
  counts: jax.Array  # int32 [N], valid entries per row


class Uplink(NamedTuple):
  """The sampled clients' links this round, as the controller chose them (ALGORITHM.md 4, 6)."""
  bandwidth_hz: jax.Array  # float32 [K], FDMA share b_k
  snr_coeff: jax.Array  # float32 [K], a_k = p beta_k g_k / N0 in Hz
  compute_s: jax.Array  # float32 [K], local training time c_k
  received: jax.Array  # float32 [K], 1 = the upload arrives, 0 = lost mid-round (E6 dropouts)


class RoundHparams(NamedTuple):
  """Per-round hyperparameters passed as traced arrays, so new values never recompile."""
  client_lr: jax.Array  # float32 []
  zeta: jax.Array  # float32 [], orthogonality penalty weight (ALGORITHM.md 2.1)
  keep_ratio: jax.Array  # float32 [], O_t in (0, 1] (ALGORITHM.md 2.3)
  uplink: Uplink | None = None  # None: latency is not simulated (reported as 0)
  # (train B, train A) weights on the factor gradients, set inside the round from its
  # aggregation rule: [2] per factor (federated/lora_rules.trained_factors), or [2, r] per
  # rank component (HetLoRA: 1 up to the client's rank); None: both trained.
  factor_mask: jax.Array | None = None


def make_hparams(client_lr: float, zeta: float = 0.0, keep_ratio: float = 1.0,
                 uplink: tuple | None = None) -> RoundHparams:
  """RoundHparams from host values; `uplink` is (bandwidth_hz, snr_coeff, compute_s[,
  received]), each [K] (received defaults to all ones)."""
  if uplink is not None:
    uplink = tuple(uplink) + ((np.ones(np.shape(uplink[0])),) if len(uplink) == 3 else ())
    uplink = Uplink(*(jnp.asarray(x, jnp.float32) for x in uplink))
  return RoundHparams(client_lr=jnp.float32(client_lr), zeta=jnp.float32(zeta),
                      keep_ratio=jnp.float32(keep_ratio), uplink=uplink)


class RoundMetrics(NamedTuple):
  train_loss: jax.Array  # float32 [], data-weighted mean over sampled clients (lost uploads too)
  client_loss: jax.Array  # float32 [K], mean local loss per sampled client
  client_bits: jax.Array  # int32 [K], uplink bits per sampled client (ALGORITHM.md 2.5)
  client_latency_s: jax.Array  # float32 [K], c_k + bits_k / R_k(b_k); 0 without an uplink
  dropped_energy: jax.Array  # float32 [], summed over clients and layers
  cov_term: jax.Array  # float32 [], sum over layers of ||sum p_k B_k A_k - Bbar Abar||_F
  orth_residual: jax.Array  # float32 [2], mean over layers for B^T B and A A^T (global factors)
  # SOFT's scores on the factors clients score (global + sent + residual, before sparsifying):
  score_gap: jax.Array  # float32 [], mean over clients and layers of ||sort(s) - sigma||/||sigma||
  score_energy: jax.Array  # float32 [], sum over clients and layers of sum_i s_i^2
  # int32 [], bits the server broadcasts beyond the global factors and head (FedEx-LoRA's
  # factored fold); 0 for the rules that broadcast only the factors.
  downlink_bits: jax.Array = 0
  # With a host client store and re-orthogonalization: the round's change of basis per layer
  # (list of reorthogonalize.Basis), for the residuals the host keeps; () otherwise.
  bases: PyTree = ()


def init_state(lora: PyTree, head: PyTree, num_clients: int, error_feedback: bool,
               server_opt: PyTree = (), scaffold: bool = False,
               personal_b: bool = False, fold: bool = False) -> ServerState:
  """Round 0: the initial global factors and head, zero residuals for all N clients, the
  server optimizer's initial state (`server_opt.make(...).init(trainable)`, () for FedAvg),
  with `scaffold` zero control variates (server and every client), and with `personal_b`
  (FedSA-LoRA) every client's B equal to the initial global B, and with `fold` (FedEx-LoRA)
  a zero fold per adapted layer."""
  per_client = lambda tree: jax.tree.map(  # noqa: E731
      lambda x: jnp.zeros((num_clients,) + x.shape, x.dtype), tree)
  copies = lambda tree: jax.tree.map(  # noqa: E731
      lambda x: jnp.broadcast_to(x, (num_clients,) + x.shape), tree)
  trainable = Trainable(lora=lora, head=head)
  return ServerState(trainable=trainable, round=jnp.zeros((), jnp.int32),
                     residuals=per_client(lora) if error_feedback else {},
                     server_opt=server_opt,
                     control=jax.tree.map(jnp.zeros_like, trainable) if scaffold else (),
                     client_controls=per_client(trainable) if scaffold else (),
                     client_factors=copies(lora_lib.b_factors(lora)) if personal_b else (),
                     folded=lora_lib.zero_folds(lora) if fold else ())
