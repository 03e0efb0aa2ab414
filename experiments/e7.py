"""E7: the federated-LoRA aggregation rules and SOFT at one rank, as seeded runs.

Every rule a run can select (`method.rule`: FedIT separate averaging, FFA-LoRA, FedSA-LoRA,
FedEx-LoRA, FLoRA, RoLoRA, FedSVD, FlexLoRA, HetLoRA at ranks 2/4/8) with dense uploads under
the fixed controller, SOFT at O = 0.5 under the fixed controller, SOFT under TSFA, and every
rule but HetLoRA under TSFA (the rank whose whole upload fits the budget, the least-latency
split each round). Compared at equal rounds (final accuracy), at an equal uplink (each run's
accuracy at the last evaluation within the cheapest run's mean total) and by the aggregation
error each leaves (`cov_term`, the mean over the last rounds). Per round time is the whole
sweep's round (all seeds in one program) over the rounds: the client compute dominates it.

References: issue 12, part 3; docs/algorithm.md section 5.
"""

from __future__ import annotations

from typing import Any

from configs import e1 as e1_config
from configs import tsfa as tsfa_config
from experiments import latency_replay, seeded
from experiments.tables import accuracy_at_bits, ci, ci_col, markdown_table, mean, per_seed
from experiments.tables import row_claims
from softjax import config as config_lib
from softjax.config import choices
from softjax.run import setup as setup_lib

RANK = 8
KEEP_RATIO = 0.5
# [choice] HetLoRA's clients at ranks 2, 4 and 8 in turn (r_max = RANK): a third of them at
# each, the spread of device classes its paper studies.
HETLORA_RANKS = "2,4,8"
# The rules with a TSFA row: every one but HetLoRA, whose ranks are given (TSFA picks the rank).
TSFA_RULES = tuple(r for r in choices.AGGREGATION_RULES if r != "hetlora")
SOFT_ARM = "soft"  # SOFT at O = KEEP_RATIO beside the rules' dense uploads
# The client quantiles at which the budget question below evaluates TSFA's offline stage
# (controller.quantile over the clients' affordable components: 0.5, the default the TSFA rows
# ran with, is the median client, 0.0 the slowest).
QUANTILES = (0.5, 0.25, 0.1, 0.0)


def _rule_config(rule: str, scale: str, rounds: int, checkpoint: str):
  config = e1_config.get_config(f"method=dense,rank={RANK},scale={scale},keep_ratio=1.0,"
                                f"rounds={rounds},checkpoint={checkpoint}").unlock()
  config.method.rule = rule
  if rule == "hetlora":
    config.method.client_ranks = HETLORA_RANKS
  return config.lock()


def arm_config(arm: str, scale: str, rounds: int, checkpoint: str):
  """The fixed-controller configuration of a rule, or of SOFT at O = KEEP_RATIO (SOFT_ARM)."""
  if arm == SOFT_ARM:
    return e1_config.get_config(f"method=soft,rank={RANK},scale={scale},"
                                f"keep_ratio={KEEP_RATIO},rounds={rounds},checkpoint={checkpoint}")
  return _rule_config(arm, scale, rounds, checkpoint)


def _rule_tsfa_config(rule: str, scale: str, rounds: int, checkpoint: str):
  """A rule's dense upload under TSFA, at SOFT + TSFA's budget and rank candidates: the rank
  whose whole upload fits, the least-latency split every round."""
  config = tsfa_config.get_config(f"controller=tsfa,method=dense,keep_ratio=1.0,scale={scale},"
                                  f"rounds={rounds},checkpoint={checkpoint}").unlock()
  config.method.rule = rule
  return config.lock()


def plan(scale: str, rounds: int, checkpoint: str,
         rules=choices.AGGREGATION_RULES) -> list[tuple[str, Any, dict[str, Any]]]:
  """E7's seeded runs as (name, config, meta): each of `rules` (default every selectable rule)
  fixed, SOFT fixed, SOFT + TSFA, and each of `rules` that has a TSFA row under TSFA."""
  out = [(f"e7_{rule}", _rule_config(rule, scale, rounds, checkpoint),
          {"method": rule, "rank": RANK, "keep_ratio": 1.0}) for rule in rules]
  out.append(("e7_soft", arm_config(SOFT_ARM, scale, rounds, checkpoint),
              {"method": "soft", "rank": RANK, "keep_ratio": KEEP_RATIO}))
  out.append(("e7_soft_tsfa", tsfa_config.get_config(
      f"controller=tsfa,scale={scale},rounds={rounds},checkpoint={checkpoint}"),
      {"method": "soft+tsfa", "rank": None, "keep_ratio": None}))
  out += [(f"e7_{rule}_tsfa", _rule_tsfa_config(rule, scale, rounds, checkpoint),
           {"method": f"{rule}+tsfa", "rank": None, "keep_ratio": None})
          for rule in tsfa_rules(rules)]
  return out


def tsfa_rules(rules=choices.AGGREGATION_RULES) -> tuple[str, ...]:
  """The rules among `rules` that E7 also runs under TSFA, in TSFA_RULES' order."""
  return tuple(r for r in TSFA_RULES if r in rules)


def run(scale: str, rounds: int, checkpoint: str, seeds: list[int], runs: str,
        workdirs: str, rules=choices.AGGREGATION_RULES) -> list[dict[str, Any]]:
  """E7's seeded runs (`plan`), each resumed from its summary in `runs` when there."""
  return [seeded.run(name, config, seeds, runs, workdirs, meta)
          for name, config, meta in plan(scale, rounds, checkpoint, rules)]


def rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Per run its per-seed values; the equal uplink is the cheapest run's mean total."""
  done = [r for r in records if "diverged" not in r]
  budget = min(mean(seeded.values(r, "cum_uplink_bits")) for r in done)
  out = []
  for r in done:
    rounds = r["per_seed"][0]["curve"]["round"][-1]
    out.append({"label": r["method"], "method": r["method"], "seeds": r["seeds"],
                "rank": r["rank"], "keep_ratio": r["keep_ratio"],
                "seed_ranks": seeded.values(r, "rank"), "equal_uplink_mb": budget / 8e6,
                "accuracy_at_equal_uplink": [accuracy_at_bits(s["curve"], budget)
                                             for s in r["per_seed"]],
                "round_s": r["round_time_s"] / rounds,
                **per_seed(r, ("final_accuracy", "mean_cov_term", "latency_over_budget"))})
  return out


def covariance_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """The fixed-controller runs' aggregation error per round and seed (for the plot)."""
  return [{"label": r["method"], "cov_term": [s["cov_term"] for s in r["per_seed"]]}
          for r in records if "diverged" not in r and not r["name"].endswith("_tsfa")]


def table(rows_: list[dict[str, Any]]) -> str:
  ranks = lambda r: "/".join(str(k) for k in sorted(set(r["seed_ranks"])))  # noqa: E731
  return markdown_table([
      ("rule / method", lambda r: r["label"]), ("rank", ranks),
      ("seeds", lambda r: str(len(r["seeds"]))),
      ci_col("final accuracy", "final_accuracy"),
      ci_col("uplink (MB)", "uplink_mb", ".2f"),
      ci_col("accuracy at equal uplink", "accuracy_at_equal_uplink"),
      ci_col("aggregation error (last rounds)", "mean_cov_term", ".4f"),
      ci_col("mean latency / budget", "latency_over_budget", ".3f"),
      ("round (s, all seeds)", lambda r: f"{r['round_s']:.2f}")], rows_) + (
      f"\nMean ± Student-t 95 % half-width over the seeds. Equal uplink: "
      f"{rows_[0]['equal_uplink_mb']:.3f} MB (the cheapest run's mean total). The round column "
      "is each sweep's under the machine's load of its day; the rules' compute is compared in "
      "one process by `python -m experiments.benchmark --sections=rules`.\n")


def claims(rows_: list[dict[str, Any]]) -> list[dict[str, Any]]:
  out = []
  for row in rows_:
    rank = row["rank"] or max(set(row["seed_ranks"]), key=row["seed_ranks"].count)
    out += row_claims("e7", row, ("final_accuracy", "uplink_mb", "accuracy_at_equal_uplink",
                                  "mean_cov_term", "latency_over_budget"), row["label"], rank,
                      row["keep_ratio"], names={"accuracy_at_equal_uplink":
                                                f"accuracy_at_{row['equal_uplink_mb']:.3f}_mb"})
  return out


def _replay_config(rule: str, scale: str, rounds: int, checkpoint: str, seed: int, **fields):
  config = _rule_tsfa_config(rule, scale, rounds, checkpoint).unlock()
  config.seed = seed
  for key, value in fields.items():
    group, name = key.split(".")
    config[group][name] = value
  return config.lock()


def budget_rows(scale: str, rounds: int, checkpoint: str, seeds: list[int],
                quantiles=QUANTILES, rules=TSFA_RULES) -> list[dict[str, Any]]:
  """Can a whole upload hold the budget, and at which rank? Per TSFA rule, replayed without
  training (experiments/latency_replay.py; exact for dense uploads): the mean latency / Tbar
  of every candidate rank under the least-latency split (osfa at that rank), and the rank
  TSFA's offline stage picks at each client quantile with the latency / Tbar it gives."""
  base = _rule_tsfa_config(TSFA_RULES[0], scale, rounds, checkpoint)
  shared = setup_lib.build_shared(base)
  out = []
  for rule in rules:
    per_rank = {r: [latency_replay.replay(
        _replay_config(rule, scale, rounds, checkpoint, s, **{"controller.name": "osfa",
                                                              "lora.rank": r}),
        shared)["latency_over_budget"] for s in seeds]
        for r in config_lib.rank_candidates(base)}
    per_quantile = {q: [latency_replay.replay(
        _replay_config(rule, scale, rounds, checkpoint, s, **{"controller.quantile": q}), shared)
        for s in seeds] for q in quantiles}
    out.append({"rule": rule, "seeds": seeds,
                "latency_over_budget_at_rank": {str(r): v for r, v in per_rank.items()},
                "tsfa": [{"quantile": q, "rank": [r["rank"] for r in runs],
                          "latency_over_budget": [r["latency_over_budget"] for r in runs]}
                         for q, runs in per_quantile.items()]})
  return out


def budget_table(rows_: list[dict[str, Any]]) -> str:
  ranks = list(rows_[0]["latency_over_budget_at_rank"])
  quantiles = [t["quantile"] for t in rows_[0]["tsfa"]]
  seen_ranks = lambda t: "/".join(str(k) for k in sorted(set(t["rank"])))  # noqa: E731
  columns = [("rule", lambda r: r["rule"])]
  columns += [(f"rank {k}", lambda r, k=k: ci(r["latency_over_budget_at_rank"][k], ".2f"))
              for k in ranks]
  columns += [(f"TSFA q = {q}", lambda r, i=i: f"rank {seen_ranks(r['tsfa'][i])}: "
               f"{ci(r['tsfa'][i]['latency_over_budget'], '.2f')}")
              for i, q in enumerate(quantiles)]
  return (f"Mean latency / budget over the rounds, {len(rows_[0]['seeds'])} seeds, replayed "
          "without training (exact for whole uploads): at each candidate rank with the "
          "least-latency split, and at the rank TSFA's offline stage picks at client quantile "
          "q (`controller.quantile`).\n\n" + markdown_table(columns, rows_))
