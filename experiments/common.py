"""What every launcher in experiments/ shares."""

import json

from absl import flags
from absl import logging


def quiet_libraries() -> None:
  """Orbax logs every checkpoint step at INFO; show warnings only unless --verbosity is given."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def user_errors() -> tuple[type[BaseException], ...]:
  """Errors caused by what the user asked for: reported as one message, without a traceback."""
  from softjax import checkpointing
  from softjax import config as config_lib
  from softjax import experiment
  from softjax.models import checkpoint as model_checkpoint

  return (config_lib.ConfigError, checkpointing.CheckpointError, FileNotFoundError,
          model_checkpoint.CheckpointMismatchError, experiment.NonFiniteLossError,
          experiment.WorkdirError)


def exit_on_user_error(fn, *args, **kwargs):
  """Calls fn; a user error ends the program with its message and exit status 1."""
  try:
    return fn(*args, **kwargs)
  except user_errors() as e:
    raise SystemExit(f"error: {e}") from None


def write_json(path: str | None, obj) -> None:
  """Writes obj as indented JSON to path (nothing when path is None or empty)."""
  if path:
    with open(path, "w") as f:
      json.dump(obj, f, indent=1)
