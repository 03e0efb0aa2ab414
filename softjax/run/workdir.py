"""The workdir of a run: writable, and held by one live run at a time.

The hold is an advisory `fcntl.flock` on `<workdir>/.lock` (one file per process of a multi-host
run). The kernel drops it when the process ends in any way, SIGKILL included, so a lock left by
a killed run never blocks the next one, and no stale-pid guessing is needed.
"""

from __future__ import annotations

import fcntl
import os
import tempfile

from softjax.errors import WorkdirError


def prepare_workdir(workdir: str) -> None:
  """Creates `workdir` and checks that a file can be written in it."""
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise WorkdirError(f"--workdir {workdir} is not a writable directory ({e}); choose another "
                       "--workdir") from e


class WorkdirLock:
  """Holds `workdir` for this process until `release` (or the process's end).

  Raises:
    WorkdirError: another live run holds the workdir; the message names its pid.
  """

  def __init__(self, workdir: str, process_index: int = 0):
    name = ".lock" if process_index == 0 else f".lock.process{process_index}"
    self.path = os.path.join(workdir, name)
    self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip() or "unknown"
      os.close(self._fd)
      raise WorkdirError(
          f"--workdir {workdir} is in use by another live run (pid {holder}); wait for it to "
          "finish, stop it, or choose another --workdir") from None
    os.ftruncate(self._fd, 0)
    os.pwrite(self._fd, str(os.getpid()).encode(), 0)

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None
