"""Four fake CPU devices for the whole suite, set before any test touches a backend, so the
sharding tests (tests/test_mesh.py) run in-process. Unsharded code places everything on
device 0 as before.

Compiling dominates the suite's time, and many tests compile the same programs (the testing
config's round, in-process and in launcher subprocesses). So each test process (each
pytest-xdist worker) keeps one persistent XLA cache for itself and the subprocesses it starts,
which inherit it through the environment. A cache per process means two processes never write
one entry at once; tests whose subprocess is killed mid-run, or that run two at once, or that
time compilation start theirs without it (`support.env_without_compilation_cache`).

The suite also compiles with XLA's backend optimizations off (`jax_disable_most_optimizations`:
LLVM optimization level 0; the HLO passes, fusion among them, still run), for itself and,
through the environment, its subprocesses. Test-scale programs run in milliseconds, so the LLVM
passes are most of their cost: tests/test_lora_rules.py took 294 s with them and 209 s without
on the 2-core Zen 1. The benchmark's subprocesses, which time the programs users run, turn them
back on (`support.env_for_timing`). A user's own JAX_DISABLE_MOST_OPTIMIZATIONS is left alone."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)
# Again after the import, in case a plugin imported JAX before this file set the variable.
jax.config.update("jax_disable_most_optimizations",
                  os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"].lower() in ("1", "true", "yes", "on"))

import pytest  # noqa: E402

from tests import support  # noqa: E402


_OURS = "SOFTJAX_TEST_XLA_CACHE"  # which cache dir the suite made


def _share_one_compilation_cache() -> None:
  inherited = os.environ.get("JAX_COMPILATION_CACHE_DIR")
  # A user's own cache is left alone; the one an xdist worker inherits from the controller
  # process is not its own.
  if inherited and inherited != os.environ.get(_OURS):
    return
  path = tempfile.mkdtemp(prefix="softjax-test-xla-")
  atexit.register(shutil.rmtree, path, ignore_errors=True)
  os.environ.update({**support.compilation_cache_env(path), _OURS: path})
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


_share_one_compilation_cache()


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
  """One backbone cache for the whole session: the tiny backbone is pretrained once."""
  return str(tmp_path_factory.mktemp("backbones"))
