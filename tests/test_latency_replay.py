"""experiments/latency_replay.py: a whole upload's latencies without training equal the run's."""

import pytest
from support import make_config

from experiments import latency_replay
from softjax import errors
from softjax.run import experiment
from softjax.run import setup as setup_lib

TSFA = {"controller.name": "tsfa", "method.name": "dense", "method.keep_ratio": 1.0,
        "lora.rank": 4, "controller.rank_candidates": "1,2,4", "wireless.budget_fraction": 0.5}


@pytest.mark.slow
@pytest.mark.parametrize("rule,overrides", [
    ("ffa", {}),  # B only: half the payload
    ("fedit", {"controller.name": "osfa"}),  # the given rank, the least-latency split
    ("fedit", {"controller.quantile": 0.0}),  # the offline stage fitted to the slowest client
])
def test_replay_gives_the_runs_rank_and_every_rounds_latency(rule, overrides, cache_dir,
                                                              tmp_path):
  config = make_config(cache_dir, rounds=3, **{**TSFA, "method.rule": rule, **overrides})
  summary = experiment.run(config, str(tmp_path / "run"))
  replayed = latency_replay.replay(config, setup_lib.build_shared(config))
  assert replayed["rank"] == summary["rank"]
  assert replayed["tbar_s"] == pytest.approx(summary["latency_budget_s"], rel=1e-12)
  assert replayed["latency_s"] == pytest.approx([r["latency_s"] for r in summary["rows"]],
                                                rel=1e-4)
  assert replayed["latency_over_budget"] == pytest.approx(
      summary["mean_latency_s"] / summary["latency_budget_s"], rel=1e-4)


@pytest.mark.parametrize("overrides,named", [
    ({"method.name": "soft", "method.keep_ratio": 0.5}, "method.name=dense"),
    ({"wireless.dropout": 0.2}, "wireless.dropout=0"),
])
def test_replay_refuses_what_training_would_change(overrides, named, cache_dir):
  config = make_config(cache_dir, rounds=2, **{**TSFA, **overrides})
  with pytest.raises(errors.UserError, match=named):
    latency_replay.check_replayable(config)
