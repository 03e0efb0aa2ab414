"""Four fake CPU devices for the whole suite, set before any test touches a backend, so the
sharding tests (tests/test_mesh.py) run in-process. Unsharded code places everything on
device 0 as before."""

import jax

jax.config.update("jax_num_cpu_devices", 4)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
  """One backbone cache for the whole session: the tiny backbone is pretrained once."""
  return str(tmp_path_factory.mktemp("backbones"))

