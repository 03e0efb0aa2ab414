"""Whole-run checkpoints with orbax: atomic, keep-last-n, resumable, loud on mismatch.

A checkpoint at step s holds the run state after s completed rounds: the device pytree (global
LoRA + head, and later per-client residuals) and a JSON record of host state (the config it was
made with; later the virtual queue and solver counters). Orbax writes each step to a temporary
directory and renames it when complete, so a run killed mid-save leaves the previous
checkpoint intact and the half-written one is never picked up. A complete step that cannot
be read (damaged files) is skipped for the previous one, with a warning (`restore_latest`).
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from softjax.errors import CheckpointError, UnreadableCheckpointError

PyTree = Any


class RunCheckpointer:
  """Saves and restores (device state, host state) pairs keyed by completed rounds."""

  def __init__(self, directory: str, *, every: int, keep: int, optional: tuple[str, ...] = ()):
    self.directory = os.path.abspath(directory)
    self.optional = optional
    self._every = every
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=False)
    # Naming the handlers up front lets a fresh manager read a step's metadata before restoring.
    handlers = {"state": ocp.StandardCheckpointHandler(), "host": ocp.JsonCheckpointHandler()}
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def steps(self) -> list[int]:
    """The kept steps, oldest first."""
    return sorted(self._manager.all_steps())

  def should_save(self, step: int, last_step: int) -> bool:
    return step % self._every == 0 or step == last_step

  def save(self, step: int, state: PyTree, host: dict[str, Any]) -> None:
    """Writes the checkpoint for `step` completed rounds and waits until it is on disk.

    Ctrl-C during the save is held until the save is complete, so an interrupted run always
    leaves a complete newest checkpoint.
    """
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), host=ocp.args.JsonSave(host))
    with _interrupts_held():
      self._manager.save(step, args=args, force=True)
      self._manager.wait_until_finished()

  def restore(self, step: int, template: PyTree) -> tuple[PyTree, dict[str, Any]]:
    """Restores `step` into the structure, shapes and dtypes of `template`.

    Top-level keys of `template` in `self.optional` that the saved tree lacks (a checkpoint
    made before they existed) are left out of the restored tree. NumPy leaves (host state)
    come back as NumPy arrays of their own dtype, float64 included.

    Raises:
      CheckpointError: naming the directory and what differs, when the saved tree does not
        match the template (a different model size, rank or target set).
    """
    saved = self._saved_metadata(step)
    template = self._saved_part(saved, template)
    self._check_shapes(step, saved, template)
    abstract = jax.tree.map(
        lambda x: x if isinstance(x, np.ndarray) else ocp.utils.to_shape_dtype_struct(x),
        template)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                              host=ocp.args.JsonRestore())
    try:
      restored = self._manager.restore(step, args=args)
    except Exception as e:  # orbax raises several types for a malformed step directory
      raise UnreadableCheckpointError(
          f"checkpoint {self.directory}/{step} could not be read ({type(e).__name__}: {e})."
      ) from e
    return restored.state, dict(restored.host)

  def restore_latest(self, template: PyTree) -> tuple[int, PyTree, dict[str, Any]] | None:
    """(step, state, host) of the newest readable checkpoint; None when there is no checkpoint.

    A step whose files cannot be read (truncated, garbled, missing) is skipped with a logged
    warning and the next older step is tried. Once one is read, the unreadable newer step
    directories are renamed to `<step>.unreadable` (kept, never deleted), so that the resumed
    run can save those steps again. When no step can be read, a CheckpointError lists them all
    and nothing is renamed. Any other CheckpointError (another model) is raised at once.
    """
    unreadable = {}
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        state, host = self.restore(step, template)
      except UnreadableCheckpointError as e:
        logging.warning("%s Trying the previous checkpoint.", e)
        unreadable[step] = e
        continue
      self.set_aside(sorted(unreadable), "unreadable")
      return step, state, host
    if unreadable:
      raise CheckpointError(
          f"no checkpoint in {self.directory} can be read:\n  " +
          "\n  ".join(str(e) for e in unreadable.values()) +
          f"\nDelete or move {self.directory} to start the run over, or use a new --workdir.")
    return None

  def set_aside(self, steps: list[int], reason: str) -> None:
    """Renames each step directory to `<step>.<reason>` (kept, never deleted), so the resumed
    run can save those steps again."""
    for step in steps:
      path = os.path.join(self.directory, str(step))
      kept, n = f"{path}.{reason}", 1
      while os.path.exists(kept):
        kept, n = f"{path}.{reason}-{n}", n + 1
      os.rename(path, kept)
      logging.warning("checkpoint %s is kept as %s (%s)", path, kept, reason)
    if steps:
      self._manager.reload()

  def _saved_part(self, saved, template: PyTree) -> PyTree:
    """`template` without the optional top-level keys the saved tree (metadata) lacks."""
    if saved is None or not isinstance(template, dict):
      return template
    return {k: v for k, v in template.items() if k in saved or k not in self.optional}

  def _saved_metadata(self, step: int):
    try:
      meta = self._manager.item_metadata(step)
      return meta["state"] if meta is not None else None
    except Exception:  # metadata is optional; restore() reports unreadable checkpoints
      return None

  def _check_shapes(self, step: int, saved, template: PyTree) -> None:
    """Compares the saved tree's leaf paths and shapes (metadata) with the template's."""
    if saved is None:
      return
    # Paths as plain names: the metadata gives a NamedTuple's fields (the server optimizer's
    # state) as dict keys.
    path = lambda p: jax.tree_util.keystr(p, simple=True, separator="/")  # noqa: E731
    want = {path(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(template)}
    have = {path(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(saved)}
    problems = [f"missing in checkpoint: {k}" for k in sorted(want.keys() - have.keys())]
    problems += [f"not in this model: {k}" for k in sorted(have.keys() - want.keys())]
    problems += [f"{k}: checkpoint {have[k]} vs model {want[k]}"
                 for k in sorted(want.keys() & have.keys()) if have[k] != want[k]]
    if problems:
      raise CheckpointError(
          f"checkpoint {self.directory}/{step} does not match this run's model "
          f"(different size, rank or LoRA targets?):\n  " + "\n  ".join(problems))

  def close(self) -> None:
    self._manager.close()


@contextlib.contextmanager
def _interrupts_held():
  """Holds SIGINT (Ctrl-C) until the block ends, then raises KeyboardInterrupt if one came.

  Outside the main thread (where signal handlers cannot be set) the block runs as it is.
  """
  caught = []
  try:
    previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
  except ValueError:
    yield
    return
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)
  if caught:
    raise KeyboardInterrupt
