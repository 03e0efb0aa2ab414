"""Server optimizers on the aggregated pseudo-gradient (FedOpt), as optax transformations.

The aggregation gives the next global model x' (factors and head); the server treats
g_t = x_t - x' as a gradient and steps x_{t+1} = x_t + update(g_t). Plain FedAvg is the
identity step (x_{t+1} = x'), which is the default and needs no optimizer state.

- FedAvgM (Hsu et al., 2019): momentum on g, `optax.sgd(lr, momentum)`:
  m_t = mu m_{t-1} + g_t, x_{t+1} = x_t - lr m_t.
- FedAdagrad, FedYogi, FedAdam (Reddi et al., *Adaptive Federated Optimization*, ICLR 2021,
  Algorithm 2), with Delta_t = -g_t:
  m_t = b1 m_{t-1} + (1 - b1) g_t,
  v_t = v_{t-1} + g_t^2                                  (FedAdagrad)
  v_t = v_{t-1} - (1 - b2) g_t^2 sign(v_{t-1} - g_t^2)     (FedYogi)
  v_t = b2 v_{t-1} + (1 - b2) g_t^2                      (FedAdam)
  x_{t+1} = x_t - lr m_t / (sqrt(v_t) + tau),  v_{-1} = tau^2.
  [choice] As in the paper, no bias correction (optax's adam and yogi correct it), so they are
  written here as one small transformation.

References: docs/algorithm.md section 6.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from softjax.config import choices

PyTree = Any
NAMES = choices.SERVER_OPTIMIZERS


class AdaptiveState(NamedTuple):
  m: PyTree
  v: PyTree


def _second_moment(name: str, v: jax.Array, g2: jax.Array, b2: float) -> jax.Array:
  if name == "fedadagrad":
    return v + g2
  if name == "fedyogi":
    return v - (1.0 - b2) * g2 * jnp.sign(v - g2)
  return b2 * v + (1.0 - b2) * g2


def adaptive(name: str, lr: float, b1: float, b2: float, tau: float
             ) -> optax.GradientTransformation:
  """FedAdagrad / FedYogi / FedAdam of the module docstring."""

  def init(params):
    return AdaptiveState(m=jax.tree.map(jnp.zeros_like, params),
                         v=jax.tree.map(lambda x: jnp.full_like(x, tau * tau), params))

  def update(grads, state, params=None):
    del params
    m = jax.tree.map(lambda m, g: b1 * m + (1.0 - b1) * g, state.m, grads)
    v = jax.tree.map(lambda v, g: _second_moment(name, v, g * g, b2), state.v, grads)
    updates = jax.tree.map(lambda m, v: -lr * m / (jnp.sqrt(v) + tau), m, v)
    return updates, AdaptiveState(m=m, v=v)

  return optax.GradientTransformation(init, update)


def make(name: str, *, lr: float = 1.0, momentum: float = 0.9, b1: float = 0.9,
         b2: float = 0.99, tau: float = 1e-3) -> optax.GradientTransformation | None:
  """The server optimizer `name` (NAMES); None for plain FedAvg."""
  if name == "fedavg":
    return None
  if name == "fedavgm":
    return optax.sgd(lr, momentum=momentum)
  if name in ("fedadagrad", "fedyogi", "fedadam"):
    return adaptive(name, lr, b1, b2, tau)
  raise ValueError(f"unknown server optimizer {name!r}; allowed: {', '.join(NAMES)}")


def step(tx: optax.GradientTransformation, current: PyTree, aggregated: PyTree,
         opt_state: PyTree) -> tuple[PyTree, PyTree]:
  """(x_{t+1}, state): the server step on g_t = x_t - aggregated."""
  grads = jax.tree.map(jnp.subtract, current, aggregated)
  updates, opt_state = tx.update(grads, opt_state, current)
  return optax.apply_updates(current, updates), opt_state
