"""The experiment: set up once on the host, then a thin loop around one jitted round.

  host, once:  data -> disjoint pretrain / federated split -> non-IID partition -> device arrays
               backbone (cached pretraining or a ViT .npz) -> frozen params
               wireless link (placement, devices) -> budget Tbar -> TSFA offline stage -> rank
               LoRA init at that rank; the latency controller (tsfa/controller.py)
               orbax: restore the whole run state (run/state.py, the virtual queue in it)
  each round:  host samples S_t -> controller: channel draw, (O_t, b_t) -> device round_fn
               -> realized latency -> queue -> metrics row -> eval / checkpoint
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from softjax import config as config_lib
from softjax.errors import (
  CheckpointError,
  Interrupted,
  NonFiniteLossError,
  WorkdirError,  # noqa: F401  (re-exported for callers)
)
from softjax.federated import placement
from softjax.run import checkpointing
from softjax.run import metrics as metrics_lib
from softjax.run import state as run_state
from softjax.run import workdir as workdir_lib
from softjax.run import writers as writers_lib
from softjax.run.runner import RoundRunner
from softjax.run.setup import Member, build_setup


def _check_finite_state(tree: dict, round_number: int, directory: str) -> None:
  """Refuses to checkpoint NaN/inf parameters (a loss can be finite while the update is not)."""
  bad = [jax.tree_util.keystr(path) for path, x in jax.tree_util.tree_leaves_with_path(tree)
         if not bool(jnp.all(jnp.isfinite(x)))]
  if bad:
    raise NonFiniteLossError(
        f"round {round_number}: the run state has NaN/inf values in {', '.join(bad[:3])}"
        f"{' ...' if len(bad) > 3 else ''} (the training loss was still finite); it is not "
        f"checkpointed, the last good checkpoint in {directory} is kept. Lower fl.client_lr.")


def _check_resumable(host: dict, config: ml_collections.ConfigDict, directory: str) -> None:
  """Refuses a checkpoint made with other settings, listing every difference."""
  conflicts = config_lib.resume_conflicts(host["config"], config)
  saved_rounds = host["config"]["fl"]["rounds"]
  if config.fl.lr_schedule != "constant" and saved_rounds != config.fl.rounds:
    conflicts.append(f"fl.rounds: checkpoint has {saved_rounds}, command has "
                     f"{config.fl.rounds}; with fl.lr_schedule={config.fl.lr_schedule!r} the "
                     "number of rounds shapes the learning rate of every round")
  if conflicts:
    raise CheckpointError(
        f"the checkpoint in {directory} was made with a different config; resume with the "
        "same settings (only " + ", ".join(config_lib.RESUMABLE_FIELDS) + " may change) or use "
        "a new --workdir. Differences:\n  " + "\n  ".join(conflicts))


def _restored_state(tree: dict, host: dict, members: int, init: run_state.RunState
                    ) -> run_state.RunState:
  """The run state of a restored tree (laid out as `init`, the initial state); a checkpoint
  made before the controller state joined the tree kept it in the host record, read instead."""
  if "controller" not in tree:
    tree = {**tree, "controller": run_state.legacy_controller(host, members)}
  return run_state.from_tree(tree, like=init)


def restore_or_init(ckpt: checkpointing.RunCheckpointer, config: ml_collections.ConfigDict,
                    init: run_state.RunState, metrics_path: str, members: int):
  """(state, host record, completed rounds, metrics rows to keep, rounds without a row).

  Resumes from the newest checkpoint. When metrics.jsonl lacks rows of rounds it already ran
  (damaged, cut off or deleted), it resumes instead from the newest checkpoint older than the
  first such round, so those rows are recomputed (exactly: every round is a pure function of
  the state before it); the newer checkpoints are set aside as `<step>.replaced`. Rows that no
  kept checkpoint can recompute are reported, never silently skipped.
  """
  template = run_state.to_tree(init)
  restored = ckpt.restore_latest(template)
  if restored is None:
    return init, {}, 0, [], []
  step, tree, host = restored
  _check_resumable(host, config, ckpt.directory)
  kept, missing = metrics_lib.recover_rows(metrics_path, step, members)
  earlier = [s for s in ckpt.steps() if missing and s < missing[0]]
  if earlier and jax.process_count() == 1:
    logging.warning("%s has no rows for rounds %s; resuming from the checkpoint after round %d "
                    "to compute them again", metrics_path, metrics_lib.describe_rounds(missing),
                    max(earlier))
    ckpt.set_aside([s for s in ckpt.steps() if s > max(earlier)], "replaced")
    step = max(earlier)
    tree, host = ckpt.restore(step, template)
    kept = [r for r in kept if r["round"] <= step]
    missing = []
  if missing:
    logging.warning("%s has no rows for rounds %s and no kept checkpoint precedes them, so they "
                    "cannot be computed again; the run goes on without them", metrics_path,
                    metrics_lib.describe_rounds(missing))
  print(f"resuming from {ckpt.directory} after {step} completed rounds", flush=True)
  return _restored_state(tree, host, members, init), host, step, kept, missing


def _host_record(config: ml_collections.ConfigDict, cum_bits: list[int]) -> dict[str, Any]:
  return {"config": json.loads(config.to_json_best_effort()), "cum_uplink_bits": cum_bits}


def _member_summary(member: Member, rows: list[dict[str, Any]], cum_bits: int
                    ) -> dict[str, Any]:
  evaluated = [r for r in rows if "test_accuracy" in r]
  latencies = [r["latency_s"] for r in rows if "latency_s" in r]
  return {"setting": member.setting,
          "final_accuracy": evaluated[-1]["test_accuracy"] if evaluated else None,
          # The whole test split (eval.final_full with an evaluation subset), else None.
          "final_accuracy_full": evaluated[-1].get("test_accuracy_full") if evaluated else None,
          "cum_uplink_bits": cum_bits, "rank": member.uplink.rank,
          "latency_budget_s": member.uplink.tbar_s,
          "offline": (dataclasses.asdict(member.uplink.offline) if member.uplink.offline
                      else None),
          # Rows written before latency was simulated (older runs resumed) have none.
          "mean_latency_s": float(np.mean(latencies)) if latencies else None,
          "max_queue": max((r["queue"] for r in rows if "queue" in r), default=None),
          "rows": rows}


def run(config: ml_collections.ConfigDict, workdir: str, *,
        on_round_end: Callable[[int], None] | None = None) -> dict[str, Any]:
  """Runs (or resumes) a federated experiment; writes config.json, metrics.jsonl, checkpoints.

  A config with a sweep block runs all its settings as one vmapped program (config/sweep.py);
  metrics.jsonl then holds one row per member and round, tagged with `member` and the swept
  values.

  Args:
    config: a ConfigDict from configs/ (validated here).
    workdir: output directory; a checkpoint in it is resumed.
    on_round_end: called with the completed round number after its rows and checkpoint are
      written (tests use it to interrupt a run at a known point).

  Returns:
    A summary dict: final_accuracy, rounds, cum_uplink_bits, wall_time_s, round_traces, rows,
    lora_template (shapes of the LoRA tree), rank (the offline stage's under tsfa),
    latency_budget_s (Tbar), offline (the tsfa plan or None), mean_latency_s, max_queue. For a
    sweep, `members` holds that dict (and `setting`) per member, and the top level only
    rounds, wall_time_s, round_traces, rows and lora_template.
  """
  config_lib.validate(config)
  if config.mesh.distributed:
    m = config.mesh  # before anything touches a device
    placement.initialize_distributed(m.coordinator_address, m.num_processes, m.process_id)
  workdir_lib.prepare_workdir(workdir)
  lock = workdir_lib.WorkdirLock(workdir, jax.process_index())
  try:
    writers_lib.check_available(config)
    return _run_held(config, workdir, on_round_end)
  finally:
    lock.release()


@dataclasses.dataclass
class _Loop:
  """What the round loop of one run works with."""
  config: ml_collections.ConfigDict
  runner: RoundRunner
  ckpt: checkpointing.RunCheckpointer
  writer: metrics_lib.MetricsWriter
  cum_bits: list[int]
  extra_writers: list  # TensorBoard, W&B (run/writers.py): the same rows


def _run_held(config: ml_collections.ConfigDict, workdir: str, on_round_end) -> dict[str, Any]:
  """run() once the workdir is held: set up, resume, loop, summarize."""
  start = time.time()
  shared, members = build_setup(config)
  if shared.mesh is not None:
    print(f"mesh: {placement.mesh_size(shared.mesh)} {shared.mesh.devices.flat[0].platform} "
          f"devices over the {shared.mesh.axis_names[0]!r} axis, {jax.process_count()} "
          "process(es)", flush=True)
  runner = RoundRunner(config, shared, members)
  # Shapes only: the state's buffers are donated to the first round.
  lora_template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                               members[0].init_state.trainable.lora)
  # Every process of a multi-host run computes the same rows; process 0 owns the usual files.
  process = jax.process_index()
  metrics_path = os.path.join(
      workdir, "metrics.jsonl" if process == 0 else f"metrics.process{process}.jsonl")
  ckpt = checkpointing.RunCheckpointer(os.path.join(workdir, "checkpoints"),
                                       every=config.checkpoint.every, keep=config.checkpoint.keep,
                                       optional=("controller",))
  try:
    state, host, done, kept, missing = restore_or_init(
        ckpt, config, runner.initial_state(), metrics_path, len(members))
    if process == 0:
      with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    cum_bits = host.get("cum_uplink_bits", [0] * len(members))
    cum_bits = list(cum_bits) if isinstance(cum_bits, list) else [cum_bits]  # older: one int
    loop = _Loop(config, runner, ckpt, metrics_lib.MetricsWriter(metrics_path, kept), cum_bits,
                 writers_lib.make_writers(config, workdir, process))
    try:
      _run_rounds(loop, state, done, on_round_end)
    finally:
      loop.writer.close()
      for writer in loop.extra_writers:
        writer.close()
  finally:
    ckpt.close()
  common = {"rounds": config.fl.rounds, "wall_time_s": time.time() - start,
            "devices": placement.mesh_size(shared.mesh), "round_traces": runner.traces,
            "rows": loop.writer.rows, "lora_template": lora_template, "missing_rounds": missing}
  return _summarize(members, loop, common)


def _run_rounds(loop: _Loop, state: run_state.RunState, done: int, on_round_end) -> None:
  """Rounds done+1 .. T: train, log, evaluate, checkpoint. Ctrl-C ends it with one line."""
  rounds, loop_start, completed = loop.config.fl.rounds, time.time(), done
  try:
    for t in range(done, rounds):
      state, rows = loop.runner.run_round(state, t)
      _check_and_count(loop, rows, t)
      if (t + 1) % loop.config.eval.every == 0 or t + 1 == rounds:
        for row, result in zip(rows, loop.runner.evaluate(state, last=t + 1 == rounds)):
          row.update(result)
      for row in rows:
        loop.writer.write(row)
        for writer in loop.extra_writers:
          writer.write(row)
      rate = (t + 1 - done) / max(time.time() - loop_start, 1e-9)
      line = metrics_lib.progress_line(rows[0], rounds, rate)
      print(line + (f" | member 1 of {len(rows)}" if loop.runner.swept else ""), flush=True)
      if loop.ckpt.should_save(t + 1, rounds):
        tree = run_state.to_tree(state)
        # The model and residuals only: the queue is legitimately inf after a dead link.
        _check_finite_state({k: v for k, v in tree.items() if k != "controller"}, t + 1,
                            loop.ckpt.directory)
        loop.ckpt.save(t + 1, tree, _host_record(loop.config, loop.cum_bits))
      completed = t + 1
      if on_round_end is not None:
        on_round_end(t + 1)
  except KeyboardInterrupt:
    newest = loop.ckpt.latest_step()
    raise Interrupted(
        f"interrupted after round {completed} (newest checkpoint: "
        f"{'none' if newest is None else f'round {newest}'}); run the same command to "
        "resume") from None


def _check_and_count(loop: _Loop, rows: list[dict[str, Any]], t: int) -> None:
  """Stops on a non-finite loss; adds each member's bits to its running total."""
  for i, row in enumerate(rows):
    member = loop.runner.members[i]
    if not np.isfinite(row["train_loss"]):
      where = f" (sweep member {i}: {member.setting})" if loop.runner.swept else ""
      raise NonFiniteLossError(
          f"round {t + 1}{where}: training loss is {row['train_loss']}; the last good "
          f"checkpoint in {loop.ckpt.directory} is kept. Lower fl.client_lr "
          f"(now {member.config.fl.client_lr}).")
    loop.cum_bits[i] += row["uplink_bits"]
    row["cum_uplink_bits"] = loop.cum_bits[i]


def _summarize(members: list[Member], loop: _Loop, common: dict[str, Any]) -> dict[str, Any]:
  """The summary dict of run(), and its printout."""
  rows = loop.writer.rows
  per_member = [_member_summary(m, [r for r in rows if r.get("member", 0) == i],
                                loop.cum_bits[i]) for i, m in enumerate(members)]
  if common["missing_rounds"]:
    print(f"note: metrics.jsonl has no rows for rounds "
          f"{metrics_lib.describe_rounds(common['missing_rounds'])} (they could not be "
          "recomputed from a kept checkpoint)", flush=True)
  if loop.runner.swept:
    summary = {**common, "members": per_member}
    for m in per_member:
      print(f"member {m['setting']}: final test accuracy {_accuracy(m)} | uplink "
            f"{m['cum_uplink_bits'] / 8e6:.2f} MB", flush=True)
    print(f"{len(members)} members in one program | wall time {common['wall_time_s']:.1f} s",
          flush=True)
  else:
    summary = {**per_member[0], **common}
    del summary["setting"]
    print(metrics_lib.summary_table(rows), flush=True)
    print(f"final test accuracy {_accuracy(summary)} | uplink "
          f"{summary['cum_uplink_bits'] / 8e6:.2f} MB | wall time {summary['wall_time_s']:.1f} s",
          flush=True)
  return summary


def _accuracy(summary: dict[str, Any]) -> str:
  accuracy, full = summary["final_accuracy"], summary["final_accuracy_full"]
  if accuracy is None:
    return "n/a (no evaluated round)"
  return f"{accuracy:.4f}" + ("" if full is None else f" (whole test split {full:.4f})")
