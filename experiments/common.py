"""What every launcher in experiments/ shares."""

import json
import sys

from absl import app, flags, logging

from softjax import config as config_lib
from softjax import errors


def quiet_libraries() -> None:
  """Orbax logs every checkpoint step at INFO; show warnings only unless --verbosity is given."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def chosen_names(flag: str, names, allowed) -> list[str]:
  """A list flag's names, each once, in the order given; one line naming the flag if any is
  not among `allowed`."""
  unknown = [n for n in names if n not in allowed]
  if unknown:
    raise errors.UserError(f"--{flag} has unknown names {unknown}; allowed: "
                           f"{', '.join(allowed)}")
  return list(dict.fromkeys(names))


def exit_on_user_error(fn, *args, **kwargs):
  """Calls fn; an error the user can fix ends the program with its one-line message.

  A `UserError` exits with status 1 (`error: ...`), Ctrl-C with 130: inside the round loop the
  run says after which round it stopped; anywhere else (set-up, pretraining) nothing was
  checkpointed yet that a rerun would not redo.
  """
  try:
    return fn(*args, **kwargs)
  except errors.Interrupted as e:
    print(e, file=sys.stderr, flush=True)
    raise SystemExit(e.exit_status) from None
  except errors.UserError as e:
    raise SystemExit(f"error: {e}") from None
  except KeyboardInterrupt:
    print("interrupted before the first round; run the same command to start again",
          file=sys.stderr, flush=True)
    raise SystemExit(errors.Interrupted.exit_status) from None


def run_launcher(main, argv: list[str] | None = None) -> None:
  """`app.run(main)`, with errors in the `--config=FILE.py:arg` flag reported in one line.

  absl parses the flags before `main` runs; a config file that does not exist or an argument
  it cannot parse would otherwise end in a traceback or a deferred IOError.
  """
  argv = sys.argv if argv is None else argv
  try:
    spec = _flag_value(argv, "config")
    if spec and (spec.endswith(".py") or ".py:" in spec):
      config_lib.require_config_file(spec.partition(":")[0])
    app.run(main, argv)
  except errors.UserError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    raise SystemExit(1) from None


def _flag_value(argv: list[str], name: str) -> str | None:
  """The value of `--name=V` or `--name V` in argv (the last one given), or None."""
  value = None
  for i, arg in enumerate(argv[1:], 1):
    if arg.startswith(f"--{name}="):
      value = arg.split("=", 1)[1]
    elif arg == f"--{name}" and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def write_json(path: str | None, obj) -> None:
  """Writes obj as indented JSON to path (nothing when path is None or empty)."""
  if path:
    with open(path, "w") as f:
      json.dump(obj, f, indent=1)
