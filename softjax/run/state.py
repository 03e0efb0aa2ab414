"""The whole run state as one pytree: the device state of the round and the controller's state.

`RunState.server` is what the jitted round takes and returns (global factors, head, round,
error-feedback residuals of all N clients, the server optimizer's state); `RunState.controller`
is the host state of the latency controller (virtual queue, solver failures). With
`fl.client_store = "host"`, `RunState.clients` holds the N clients' per-client state on the host
and the server's per-client fields hold only the K rows of a round (federated/client_store.py).
For a sweep every leaf has a leading `[S]` member axis. Orbax saves `to_tree(state)` whole; the
tree is the same for either store, so a checkpoint resumes with either.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from softjax.federated import client_store as client_store_lib
from softjax.federated import types as fl_types
from softjax.tsfa import controller as controller_lib

PyTree = Any


class RunState(NamedTuple):
  server: fl_types.ServerState  # device arrays; [S, ...] for a sweep
  controller: controller_lib.ControllerState  # host arrays; [S] for a sweep
  clients: client_store_lib.ClientStore | None = None  # the host store; None: on the device


def to_tree(state: RunState) -> dict:
  """The checkpointed tree; its keys are those of the checkpoints made before the controller
  state joined it, plus `controller`."""
  server = state.server
  if state.clients is not None:
    # All N rows, brought into the current basis (the checkpoint of a device store holds them so).
    server = server._replace(**state.clients.materialized())
  tree = {"lora": server.trainable.lora, "head": server.trainable.head, "round": server.round,
          "residuals": server.residuals, "controller": state.controller._asdict()}
  # Optional parts appear only when used, so a plain run keeps the tree of earlier checkpoints.
  for key in ("server_opt", "control", "client_controls", "client_factors", "folded"):
    if jax.tree.leaves(getattr(server, key)):
      tree[key] = getattr(server, key)
  return tree


def from_tree(tree: dict, like: RunState | None = None) -> RunState:
  """The run state of a checkpointed tree; with `like` (the run's initial state) holding a host
  store, the N rows go into a new host store and the server keeps `like`'s K-row fields."""
  server = fl_types.ServerState(
      trainable=fl_types.Trainable(lora=tree["lora"], head=tree["head"]), round=tree["round"],
      residuals=tree.get("residuals", {}), server_opt=tree.get("server_opt", ()),
      control=tree.get("control", ()), client_controls=tree.get("client_controls", ()),
      client_factors=tree.get("client_factors", ()), folded=tree.get("folded", ()))
  c = tree["controller"]
  controller = controller_lib.ControllerState(
      queue=np.asarray(c["queue"], np.float64), fallbacks=np.asarray(c["fallbacks"], np.int64))
  clients = None
  if like is not None and like.clients is not None:
    clients = client_store_lib.ClientStore(client_store_lib.fields_of(server),
                                           like.clients.swept, like.clients.lazy_basis)
    clients.start(int(np.max(np.asarray(tree["round"]))))
    server = server._replace(**client_store_lib.fields_of(like.server))
  return RunState(server, controller, clients)


def legacy_controller(host: dict, members: int) -> dict:
  """The controller subtree of a checkpoint made before it held one: the queues and counters
  its JSON host record kept (`controllers`, one dict per member), stacked for a sweep."""
  saved = host.get("controllers") or [{"queue": 0.0, "fallbacks": 0}] * members
  queue = np.asarray([float(s["queue"]) for s in saved], np.float64)
  fallbacks = np.asarray([int(s["fallbacks"]) for s in saved], np.int64)
  return {"queue": queue if members > 1 else queue[0],
          "fallbacks": fallbacks if members > 1 else fallbacks[0]}


def stack_trees(trees, xp=jnp):
  """Stacks pytrees on a new leading axis (the sweep axis)."""
  return jax.tree.map(lambda *xs: xp.stack(xs), *trees)


def member_slice(tree, i: int):
  return jax.tree.map(lambda x: x[i], tree)
