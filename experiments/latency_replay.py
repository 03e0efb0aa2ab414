"""A whole upload's round latencies, replayed on the host without training.

A dense upload (any aggregation rule) sends every component, so its payload does not depend on
what the clients learn, and with perfect CSI and no dropout the round's latency is the one the
controller predicts when it splits the bandwidth (equal to 1e-4 in every round: the
rules-under-osfa/tsfa tests). Replaying the run's own controller (`setup.plan_uplink`,
`setup.make_controller`, the same sampled clients and channel draws) over the rounds gives the
run's latencies in seconds of host time instead of a training run. E7 uses it to ask at which
client quantile the TSFA offline stage's rank lets a whole upload hold the budget.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np

from softjax import errors
from softjax.federated import schedule
from softjax.models import apply as apply_lib
from softjax.models import lora as lora_lib
from softjax.run import setup as setup_lib
from softjax.tsfa import controller as controller_lib


def check_replayable(config: ml_collections.ConfigDict) -> None:
  """Only a whole upload's latency is independent of training, and only with perfect CSI and
  no dropout is it the controller's prediction."""
  if config.method.name != "dense":
    raise errors.UserError(f"a latency replay needs method.name=dense (a whole upload), got "
                           f"{config.method.name!r}: a sparse upload's payload depends on training")
  if config.wireless.csi_error or config.wireless.dropout:
    raise errors.UserError("a latency replay needs wireless.csi_error=0 and wireless.dropout=0 "
                           "(otherwise the realized latency is not the predicted one)")


def replay(config: ml_collections.ConfigDict, shared: setup_lib.SharedSetup) -> dict[str, Any]:
  """The run's offline rank, budget and per-round latency, without training.

  Args:
    config: a run config (no sweep) with a whole upload, perfect CSI and no dropout.
    shared: `setup.build_shared` of a config with the same data and model.

  Returns:
    {rank, tbar_s, latency_s: [rounds], latency_over_budget (mean latency / Tbar)}.
  """
  check_replayable(config)
  uplink = setup_lib.plan_uplink(config, shared.vit_config, shared.layer_dims,
                                 shared.head_params, shared.pilot_spectrum)
  model = apply_lib.make_model(config, shared.vit_config, uplink.rank)
  lora = jax.eval_shape(lambda: lora_lib.init_lora(model, jax.random.key(0),
                                                   shared.image_shape))
  controller = setup_lib.make_controller(config, uplink, lora, shared.layer_dims,
                                         shared.head_params)
  state, latencies = controller_lib.init_state(), []
  fl = config.fl
  for t in range(fl.rounds):
    ids = schedule.sample_clients(config.seed, t, fl.num_clients, fl.clients_per_round)
    plan, state = controller.plan(state, t, ids, None)
    latencies.append(plan.predicted_latency_s)
    state = controller.observe(state, plan.predicted_latency_s)
  return {"rank": uplink.rank, "tbar_s": uplink.tbar_s, "latency_s": latencies,
          "latency_over_budget": float(np.mean(latencies)) / uplink.tbar_s}
