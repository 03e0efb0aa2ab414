"""TSFA stage 1, before round 0: the rank rbar and the initial keep ratio O_0.

With the channel replaced by its mean and the band split equally, a closed form says how many
components per layer a typical client can upload within the budget (mbar), which fixes
O_0 = min(1, mbar / r) and, through a model of the update's spectrum, the rank rbar that
minimizes the rank-dependent terms of the convergence bound J(r).

References: ALGORITHM.md section 5.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import numpy as np

from softjax.sparsify.payload import worst_case_index_bits
from softjax.wireless import channel as channel_lib
from softjax.wireless import link as link_lib


def approx_rate_bps(beta, cfg: channel_lib.ChannelConfig, clients_per_round: int) -> np.ndarray:
  """Rate on the approximated channel: mean fading, equal split of the band.

  `Rbar_k = (B_tot / K) log2(1 + K p beta_k / (B_tot N0))`, i.e. `link_lib.rate_bps` on a band of
  B_tot / K with g = 1.

  Args:
    beta: [N] large-scale gains.
    cfg: the channel config.
    clients_per_round: K.

  Returns:
    [N] rates in bit/s.

  References: ALGORITHM.md section 5, step 1.
  """
  return link_lib.rate_bps(cfg.bandwidth_hz / clients_per_round,
                           channel_lib.snr_coefficient_hz(beta, 1.0, cfg))


def affordable_components(tbar_s: float, compute_s_q: float, rate_q: float, head_bits: float,
                          index_bits: float, value_bits: int, sum_dims: int) -> int:
  """Components per layer a client can upload within the budget, in closed form.

  `mbar = floor(((Tbar - c) * Rbar - head_bits - index_bits) / (q * sum_l (d_in + d_out)))`,
  clipped at 0: the bits that fit in the time left after local compute, less the fixed costs,
  divided by the cost of one component in every layer.

  Args:
    tbar_s: latency budget Tbar.
    compute_s_q: compute time c of the reference client.
    rate_q: its approximated rate Rbar in bit/s.
    head_bits: bits of the dense head.
    index_bits: index bits (see `worst_case_index_bits`).
    value_bits: q, bits per value.
    sum_dims: sum_l (d_in_l + d_out_l).

  Returns:
    mbar >= 0 (may exceed r: then the dense upload fits).

  References: ALGORITHM.md section 5, step 2.
  """
  spare_bits = (tbar_s - compute_s_q) * rate_q - head_bits - index_bits
  if not np.isfinite(spare_bits) or spare_bits <= 0:
    return 0
  return int(math.floor(spare_bits / (value_bits * sum_dims)))


def affordable_components_quantile(tbar_s: float, compute_s, rates_bps, *, head_bits: float,
                                   index_bits: float, value_bits: int, sum_dims: int,
                                   quantile: float = 0.5) -> int:
  """mbar of the client at a quantile of the population (default the median).

  [choice] The quantile is taken over the clients' own mbar (equivalently over their bit budgets
  `(Tbar - c_k) Rbar_k`, on which mbar is monotone), not over c and Rbar separately: separate
  quantiles could pair the compute time of one client with the rate of another. The
  "inverted_cdf" quantile returns an actual client's value.

  Args:
    tbar_s: latency budget Tbar.
    compute_s: [N] compute times.
    rates_bps: [N] approximated rates (see `approx_rate_bps`).
    head_bits, index_bits, value_bits, sum_dims: as in `affordable_components`.
    quantile: in [0, 1].

  Returns:
    mbar >= 0.

  References: ALGORITHM.md section 5, step 2.
  """
  compute_s, rates_bps = np.broadcast_arrays(np.asarray(compute_s, np.float64),
                                             np.asarray(rates_bps, np.float64))
  per_client = [affordable_components(tbar_s, c, r, head_bits, index_bits, value_bits, sum_dims)
                for c, r in zip(compute_s.ravel(), rates_bps.ravel())]
  return int(np.quantile(per_client, quantile, method="inverted_cdf"))


def initial_keep_ratio(mbar: int, rank: int) -> float:
  """`O_0(r) = min(1, mbar / r)`; the client then keeps max(1, ceil(O_0 r)) components.

  References: ALGORITHM.md section 5, step 3.
  """
  return min(1.0, mbar / rank)


def spectrum_energies(r_max: int, gamma: float = 1.0, singular_values=None) -> np.ndarray:
  """Normalized energies sigma_i^2 (descending, summing to 1) of the ideal update.

  Either the power law `sigma_i^2 ~ i^-gamma` over i = 1..r_max, or the squares of given singular
  values (the pilot-gradient option: pass the singular values of a full-weight gradient), sorted
  descending and normalized over all of them.

  Args:
    r_max: length of the power-law spectrum (ignored with singular_values).
    gamma: power-law exponent.
    singular_values: optional 1-D array of singular values (not squared).

  Returns:
    1-D energies summing to 1.

  References: ALGORITHM.md section 5, step 4.
  """
  if singular_values is None:
    energies = np.arange(1, r_max + 1, dtype=np.float64) ** (-float(gamma))
  else:
    energies = np.sort(np.asarray(singular_values, np.float64).ravel() ** 2)[::-1]
  total = energies.sum()
  if not total > 0:
    raise ValueError("the spectrum has no energy")
  return energies / total


def kept_components(r: int, mbar: int) -> int:
  """m = min(r, max(1, mbar)): the components a rank-r client keeps when mbar fit the budget;
  at least one (ALGORITHM.md 2.3)."""
  return min(r, max(1, int(mbar)))


def rank_objective_terms(r: int, mbar: int, r_max: int, gamma: float = 1.0,
                         singular_values=None) -> tuple[float, float, float]:
  """The three rank-dependent terms of the bound at the initial keep ratio O_0(r).

  Derivation (our reconstruction): a rank-r adapter can at best carry the top r components of
  the ideal update, so
  - rho(r), the rank deficiency, is the energy beyond rank r (decreasing in r);
  - eps_sp(r), the sparsification error, is the energy of the components the client drops when
    it keeps m = min(r, max(1, mbar)) of its r: those ranked m+1..r (0 while r <= mbar, then
    increasing). The max(1, .) follows ALGORITHM.md 2.3, which always keeps one component;
  - kappa(r) = r / r_max [choice: linear covariance cost]: the covariance between separately
    averaged B and A is a sum over components of terms of comparable size, so it grows about
    linearly with the number of components; normalized by r_max to lie in (0, 1].

  Args:
    r: candidate rank.
    mbar: affordable components per layer (`affordable_components`).
    r_max: largest rank considered (normalizes kappa; length of the power-law spectrum).
    gamma: power-law exponent.
    singular_values: optional spectrum (see `spectrum_energies`).

  Returns:
    (rho, eps_sp, kappa).

  References: ALGORITHM.md section 5, step 4.
  """
  energies = spectrum_energies(r_max, gamma, singular_values)
  kept = kept_components(r, mbar)
  rho = float(energies[r:].sum())
  eps_sp = float(energies[kept:r].sum())
  kappa = r / r_max
  return rho, eps_sp, kappa


def in_flight_share(r: int, mbar: int, participations: float) -> float:
  """The share of the dropped energy that error feedback has not delivered by the end of
  training: `min(1, (r / m - 1) / P)`, m = min(r, max(1, mbar)), P the participations.

  Derivation (docs/algorithm.md section 2, "in-flight"): with error feedback a component the
  client drops is not lost; it stays in the client's residual, whose score grows until the
  component is among the m sent. Sending m of r components a participation, every component is
  sent about once every r / m participations, so a dropped update waits up to r / m - 1 of
  them. Over a run in which a client takes part P times, only what was dropped in the last
  r / m - 1 participations is still in the residual at the end: that share of eps_sp is lost,
  the rest arrives late. The share is 0 when every component fits (r <= m) and 1 when one
  cycle through the components outlasts the run.

  Args:
    r: candidate rank.
    mbar: affordable components per layer.
    participations: P > 0, a client's expected participations over the run (T K / N).

  Returns:
    The share in [0, 1].

  References: ALGORITHM.md section 5, step 4.
  """
  if not participations > 0:
    raise ValueError(f"participations must be > 0, got {participations}")
  return min(1.0, (r / kept_components(r, mbar) - 1.0) / participations)


def rank_objective(r: int, mbar: int, gamma: float, lambda_sp: float, lambda_cov: float,
                   r_max: int, singular_values=None, participations: float | None = None) -> float:
  """`J(r) = rho(r) + lambda_sp * w(r) * eps_sp(r) + lambda_cov * kappa(r)`.

  w(r) = 1 prices every dropped component as lost (`controller.sparsification_cost =
  dropped`); with `participations`, w(r) = `in_flight_share` prices only what error feedback
  has not delivered by the end (`in_flight`).

  Args:
    r: candidate rank.
    mbar: affordable components per layer.
    gamma: power-law exponent (unused with singular_values).
    lambda_sp: weight of the sparsification error.
    lambda_cov: weight of the covariance cost.
    r_max: largest rank considered.
    singular_values: optional spectrum for the pilot-gradient option.
    participations: None, or a client's expected participations (the in-flight cost).

  Returns:
    J(r).

  References: ALGORITHM.md section 5, step 4.
  """
  rho, eps_sp, kappa = rank_objective_terms(r, mbar, r_max, gamma, singular_values)
  share = 1.0 if participations is None else in_flight_share(r, mbar, participations)
  return rho + lambda_sp * share * eps_sp + lambda_cov * kappa


def select_rank(candidates: Sequence[int], mbar: int | Callable[[int], int], gamma: float = 1.0,
                lambda_sp: float = 1.0, lambda_cov: float = 0.1, r_max: int | None = None,
                singular_values=None,
                participations: float | None = None) -> tuple[int, dict[int, float]]:
  """`rbar = argmin_r J(r)` over candidate ranks; ties go to the smaller rank (cheaper).

  Args:
    candidates: ranks to compare.
    mbar: affordable components, an int or a function of the rank (its index bits depend on r).
    gamma, lambda_sp, lambda_cov, singular_values, participations: as in `rank_objective`.
    r_max: defaults to max(candidates).

  Returns:
    (rbar, {r: J(r)}).

  References: ALGORITHM.md section 5, step 4.
  """
  ranks = sorted(int(r) for r in candidates)
  if not ranks or ranks[0] < 1:
    raise ValueError(f"candidates must be ranks >= 1, got {list(candidates)}")
  r_max = ranks[-1] if r_max is None else r_max
  mbar_of = mbar if callable(mbar) else (lambda _: mbar)
  values = {r: rank_objective(r, mbar_of(r), gamma, lambda_sp, lambda_cov, r_max, singular_values,
                             participations) for r in ranks}
  best = min(ranks, key=lambda r: (values[r], r))
  return best, values


@dataclasses.dataclass(frozen=True)
class RankWeights:
  """The weights of J(r) (ALGORITHM.md section 5, step 4), as `select_rank` takes them.

  Attributes:
    gamma: power-law exponent of the assumed spectrum (unused with singular_values).
    lambda_sp: weight of the sparsification error.
    lambda_cov: weight of the covariance cost.
    singular_values: optional measured spectrum (the pilot-gradient option).
    participations: None (every dropped component priced as lost), or a client's expected
      participations over the run (only what error feedback has not delivered is priced).
  """

  gamma: float = 1.0
  lambda_sp: float = 1.0
  lambda_cov: float = 0.1
  singular_values: np.ndarray | None = None
  participations: float | None = None


@dataclasses.dataclass(frozen=True)
class OfflinePlan:
  """What the offline stage broadcasts before round 0, and how it got there.

  Attributes:
    rank: rbar, the chosen LoRA rank.
    keep_ratio: O_0(rbar) = min(1, mbar / rbar).
    mbar: {r: affordable components per layer} (depends on r through the index bits).
    objective: {r: J(r)}.
  """

  rank: int
  keep_ratio: float
  mbar: dict[int, int]
  objective: dict[int, float]


def plan_offline(candidates: Sequence[int], *, tbar_s: float, compute_s, approx_rates_bps,
                 layer_dims: Sequence[tuple[int, int]], head_params: int, value_bits: int,
                 quantile: float = 0.5, weights: RankWeights = RankWeights(),
                 whole_upload: int | None = None) -> OfflinePlan:
  """Stage 1 end to end: mbar(r) at the client quantile, rbar = argmin J(r), O_0(rbar).

  With `whole_upload` (a dense upload, which sends all r components and no index) the client
  drops nothing, so a rank must fit instead: [choice] rbar = argmin J(r) over the candidates
  with r <= mbar(r), where J's sparsification term is 0 (the smallest candidate when none
  fits), and O_0 = 1.

  Args:
    candidates: ranks to compare.
    tbar_s: the latency budget Tbar.
    compute_s: [N] compute times of all clients, or r -> [N] (the LoRA paths add compute that
      grows with the rank).
    approx_rates_bps: [N] rates on the approximated channel (`approx_rate_bps`).
    layer_dims: (d_in, d_out) of every adapted matrix.
    head_params: head values (sent densely).
    value_bits: q.
    quantile: as in `affordable_components_quantile`.
    weights: J(r)'s weights, as in `select_rank`.
    whole_upload: values one component costs over every layer when the upload is whole
      (`federated.lora_rules.component_values`); None: SOFT's sparse upload.

  Returns:
    An OfflinePlan.

  References: ALGORITHM.md section 5, steps 1-5.
  """
  dims = [tuple(d) for d in layer_dims]
  sum_dims = sum(d_in + d_out for d_in, d_out in dims) if whole_upload is None else whole_upload
  compute_of = compute_s if callable(compute_s) else (lambda _: compute_s)
  mbar = {int(r): affordable_components_quantile(
      tbar_s, compute_of(int(r)), approx_rates_bps, head_bits=value_bits * head_params,
      index_bits=0 if whole_upload is not None else worst_case_index_bits(len(dims), int(r)),
      value_bits=value_bits, sum_dims=sum_dims, quantile=quantile) for r in candidates}
  ranks = list(mbar)
  if whole_upload is not None:
    ranks = [r for r in ranks if r <= mbar[r]] or [min(ranks)]
  rbar, objective = select_rank(ranks, mbar.__getitem__, weights.gamma, weights.lambda_sp,
                                weights.lambda_cov, r_max=max(mbar),
                                singular_values=weights.singular_values,
                                participations=weights.participations)
  keep = 1.0 if whole_upload is not None else initial_keep_ratio(mbar[rbar], rbar)
  return OfflinePlan(rbar, keep, mbar, objective)
