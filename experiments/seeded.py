"""Seeded runs: one configuration's seeds as one vmapped sweep, kept as a small JSON summary.

A run has a name (`soft_r8_reorth`, `tlora_r4`); its checkpoints live in WORKDIRS/<name>
(resumed where they stopped; never committed), and when it finishes its per-seed summary is
written to RUNS/<name>.json (a few kB: commit it). A run whose summary exists is read, not run
again, so an interrupted suite resumes instead of repeating, and experiments that share a
configuration (E1's SOFT rows and the orthogonality study) share its run. The seeds vary the
initialization, the client draws and the channel; the data partition stays the base config's
(softjax/config/sweep.py), so a claim's interval does not cover other partitions.

A summary is reused only for the run it describes: the same seeds, the same identifying fields
(method, rank, ...), the same number of rounds, and, for summaries written since it was
recorded, the same configuration fingerprint (`fingerprint`). Anything else is one line naming
the file and what differs, so a changed config never silently reads another run's numbers.

Per seed the summary keeps what every table is computed from:
  final_accuracy       mean test accuracy of the last 3 evaluations (stats.final_accuracy),
  final_accuracy_full  the whole test split in the last round (None without an eval subset),
  cum_uplink_bits      bits uploaded over the run,
  curve                {round, test_accuracy, cum_uplink_bits} of the evaluated rounds,
  setting              the member's sweep setting (its seed, and any other swept field),
  mean_cov_term        the covariance term of ALGORITHM.md 3 over the last TAIL_ROUNDS rounds
                       (cov_term: per round),
  the controller's     rank (TSFA's offline choice), offline (its plan), the latency budget,
                       mean latency and their ratio, the virtual queue (per round, max, final),
                       mean keep ratio, solver fallbacks,
and, for SOFT, the orthogonality diagnostics averaged over the last TAIL_ROUNDS rounds:
the global factors' residuals for B and A, the gap between SOFT's scores and the singular
values of what clients score, and the share of the score energy a client drops.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from typing import Any

import jax
import jaxlib
import ml_collections

from experiments import round_timing, stats
from softjax import config as config_lib
from softjax import errors
from softjax.run import experiment

TAIL_ROUNDS = 20
SOFT_DIAGNOSTICS = ("orth_residual_B", "orth_residual_A", "score_gap", "dropped_share")
# Config fields that decide where a run executes or what it writes, not its numbers.
_NOT_RESULTS = ("checkpoint", "metrics", "mesh", "data.data_dir", "model.cache_dir",
                "fl.client_parallelism", "fl.client_store", "seed", "sweep.seed")
# Config fields added after runs were recorded, with the default that reproduces the runs made
# before them: at that default a field is left out of the fingerprint, so adding a field does
# not orphan every committed summary; set to anything else, it is part of the identity.
_ADDED_FIELDS = {"method.client_ranks": "", "controller.sparsification_cost": "dropped"}


def with_seeds(config: ml_collections.ConfigDict, seeds: list[int]) -> ml_collections.ConfigDict:
  """A copy of the config with its seeds as one sweep (a single seed runs plain).

  A single seed keeps the base config's data partition, as a sweep's members do
  (softjax/config/sweep.py): seed s run alone is then the sweep's member s, which the seeds
  that TSFA makes run one by one rely on to pair with swept rows.
  """
  config = copy.deepcopy(config).unlock()
  if len(seeds) > 1:
    config.sweep.seed = ",".join(map(str, seeds))
  else:
    config.data.partition_seed = config_lib.partition_seed(config)
    config.seed, config.sweep.seed = seeds[0], ""
  return config.lock()


def curve(rows: list[dict[str, Any]]) -> dict[str, list]:
  """{round, test_accuracy, cum_uplink_bits} of the evaluated rows."""
  evaluated = [r for r in rows if "test_accuracy" in r]
  return {"round": [r["round"] for r in evaluated],
          "test_accuracy": [r["test_accuracy"] for r in evaluated],
          "cum_uplink_bits": [r["cum_uplink_bits"] for r in evaluated]}


def _tail_mean(rows: list[dict[str, Any]], value) -> float:
  tail = rows[-TAIL_ROUNDS:]
  return sum(value(r) for r in tail) / len(tail)


def _dropped_share(row: dict[str, Any]) -> float:
  return row["dropped_energy"] / row["score_energy"] if row["score_energy"] else 0.0


def _controller_fields(member: dict[str, Any]) -> dict[str, Any]:
  """What E2, E4-E6 compare of a run under a latency budget (ALGORITHM.md 4-6)."""
  rows = member["rows"]
  return {"rank": member["rank"], "offline": member["offline"],
          "latency_budget_s": member["latency_budget_s"],
          "mean_latency_s": member["mean_latency_s"],
          "latency_over_budget": member["mean_latency_s"] / member["latency_budget_s"],
          "max_queue": member["max_queue"], "final_queue": rows[-1]["queue"],
          "mean_keep_ratio": sum(r["keep_ratio"] for r in rows) / len(rows),
          "fallbacks": sum(r["fallbacks"] for r in rows), "queue": [r["queue"] for r in rows]}


def seed_record(member: dict[str, Any]) -> dict[str, Any]:
  """One seed's summary from its experiment.run member summary (the module docstring's fields,
  the mean covariance term of the last TAIL_ROUNDS rounds, and the controller's fields)."""
  rows = member["rows"]
  evaluated = [r for r in rows if "test_accuracy" in r]
  record = {"final_accuracy": stats.final_accuracy(rows),
            "final_accuracy_full": evaluated[-1].get("test_accuracy_full"),
            "cum_uplink_bits": rows[-1]["cum_uplink_bits"], "curve": curve(rows),
            "mean_cov_term": _tail_mean(rows, lambda r: r["cov_term"]),
            "cov_term": [r["cov_term"] for r in rows], **_controller_fields(member)}
  if rows[-1].get("score_energy"):  # a SOFT run scored components
    record.update({
        "orth_residual_B": _tail_mean(rows, lambda r: r["orth_residual_B"]),
        "orth_residual_A": _tail_mean(rows, lambda r: r["orth_residual_A"]),
        "score_gap": _tail_mean(rows, lambda r: r["score_gap"]),
        "dropped_share": _tail_mean(rows, _dropped_share)})
  return record


def _members(summary: dict[str, Any], seeds: list[int]) -> list[dict[str, Any]]:
  return summary.get("members") or [dict(summary, setting={"seed": seeds[0]})]


def fingerprint(config: ml_collections.ConfigDict) -> str:
  """A short sha256 of the config less `_NOT_RESULTS` and the `_ADDED_FIELDS` at their
  defaults (seeds are checked on their own)."""
  tree = config.to_dict()
  for key in _NOT_RESULTS + tuple(_ADDED_FIELDS):
    *parents, leaf = key.split(".")
    node = tree
    for parent in parents:
      node = node.get(parent, {})
    if key in _NOT_RESULTS or node.get(leaf) == _ADDED_FIELDS[key]:
      node.pop(leaf, None)
  return hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _last_round(record: dict[str, Any]) -> int | None:
  runs = record.get("per_seed") or [{}]
  rounds = runs[0].get("curve", {}).get("round")
  return rounds[-1] if rounds else None


def _mismatch(record: dict[str, Any], seeds: list[int], fields: dict[str, Any],
              config: ml_collections.ConfigDict) -> str | None:
  """What makes `record` another run than the one asked for, or None."""
  if record["seeds"] != seeds:
    return (f"holds seeds {record['seeds']}, not the {seeds} asked for (--seeds="
            f"{','.join(map(str, record['seeds']))} reads it)")
  for key, want in fields.items():
    if record.get(key) != json.loads(json.dumps(want)):
      return f"has {key}={record.get(key)!r}, not the {want!r} asked for"
  last = _last_round(record)
  if last is not None and last != config.fl.rounds:
    return f"ran {last} rounds, not the {config.fl.rounds} asked for (--rounds)"
  kept = record.get("config_sha256")
  if kept is not None and kept != fingerprint(config):
    return "was run with another configuration (its config_sha256 differs)"
  return None


def _load(path: str, seeds: list[int], fields: dict[str, Any],
          config: ml_collections.ConfigDict) -> dict[str, Any]:
  try:
    with open(path) as f:
      record = json.load(f)
    problem = _mismatch(record, seeds, fields, config)
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise errors.UserError(f"{path} is not a readable run summary ({e}); delete it to run "
                           "that configuration again") from None
  if problem:
    raise errors.UserError(f"{path} {problem}; delete it (or pass another --runs) to run this "
                           "configuration")
  return record


def run(name: str, config: ml_collections.ConfigDict, seeds: list[int], runs_dir: str,
        workdirs: str, fields: dict[str, Any]) -> dict[str, Any]:
  """RUNS/<name>.json, run first (as one sweep over `seeds`) if it is not there.

  Args:
    name: the run's file and workdir name.
    config: the configuration (its seed fields are replaced by `seeds`).
    seeds: the seeds, one vmapped sweep.
    runs_dir: where the summaries are written (commit them).
    workdirs: where the runs' checkpoints and metrics live.
    fields: what identifies the configuration in the record (method, rank, ...).

  Returns:
    {name, **fields, seeds, config_sha256 (`fingerprint`), per_seed: [seed_record],
    lora_shapes (the LoRA tree's shapes; the first seed's), machine (CPU, backend, jaxlib),
    round_time_s (the sweep's rounds, summed over every invocation that ran them), wall_time_s (this invocation's, short when it
    resumed a finished workdir), one_by_one (only when TSFA gave the seeds different ranks and
    each ran alone)}, or, when the loss went non-finite (a measured outcome too: recorded, not
    retried), {name, **fields, seeds, diverged}.
  """
  path = os.path.join(runs_dir, f"{name}.json")
  if os.path.exists(path):
    return _load(path, seeds, fields, config)
  record = {"name": name, **fields, "seeds": seeds, "config_sha256": fingerprint(config)}
  try:
    record.update(_run_seeds(name, config, seeds, workdirs))
  except errors.NonFiniteLossError as e:
    record["diverged"] = str(e)
  os.makedirs(runs_dir, exist_ok=True)
  with open(path, "w") as f:
    json.dump(record, f, indent=1)
  return record


def _run_seeds(name: str, config: ml_collections.ConfigDict, seeds: list[int],
               workdirs: str) -> dict[str, Any]:
  """The seeds as one vmapped sweep; where TSFA gives the seeds different ranks (a rank is a
  shape: one program cannot hold them), each seed alone in its own workdir, marked
  `one_by_one` (its round time is then the sum of the seeds' runs)."""
  try:
    summaries = [experiment.run(with_seeds(config, seeds), os.path.join(workdirs, name))]
    members = _members(summaries[0], seeds)
    one_by_one = False
  except errors.SweepRanksError as e:
    print(f"{name}: {e}; running the seeds one by one", flush=True)
    summaries = [experiment.run(with_seeds(config, [s]), os.path.join(workdirs, f"{name}_seed{s}"))
                 for s in seeds]
    members = [_members(summary, [s])[0] for summary, s in zip(summaries, seeds)]
    one_by_one = True
  # A sweep's members share each round's time; seeds run alone each have their own.
  timed = members if one_by_one else members[:1]
  return {"per_seed": [{"setting": m["setting"], **seed_record(m)} for m in members],
          "lora_shapes": jax.tree.map(lambda x: list(x.shape), summaries[0]["lora_template"]),
          "round_time_s": sum(r["round_time_s"] for m in timed for r in m["rows"]),
          "wall_time_s": sum(s["wall_time_s"] for s in summaries),
          # The same config and seed follow different trajectories on different CPUs (XLA's
          # code and summation order differ), so a summary names where it ran.
          "machine": {**round_timing.cpu(), "backend": jax.default_backend(),
                      "jaxlib_version": jaxlib.__version__},
          **({"one_by_one": True} if one_by_one else {})}


def by_setting(record: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
  """A run whose config sweeps more than the seed (E5's grid), split per setting.

  Returns:
    [(setting without the seed, the record with only that setting's seeds)], in the order the
    settings first appear.
  """
  groups: dict[str, tuple[dict[str, Any], list]] = {}
  for s in record["per_seed"]:
    setting = {k: v for k, v in s["setting"].items() if k != "seed"}
    groups.setdefault(json.dumps(setting, sort_keys=True), (setting, []))[1].append(s)
  return [(setting, {**record, "per_seed": members}) for setting, members in groups.values()]


def values(record: dict[str, Any], key: str) -> list[float]:
  """The per-seed values of `key` (seeds where it is None left out)."""
  return [s[key] for s in record["per_seed"] if s.get(key) is not None]


def interval(record: dict[str, Any], key: str) -> tuple[float, float] | None:
  """(mean, 95 % Student-t half-width) of `key` over the seeds, None if no seed has it."""
  got = values(record, key)
  return stats.mean_ci95(got) if got else None
