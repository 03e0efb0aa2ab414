"""Four fake CPU devices for the whole suite, set before any test touches a backend, so the
sharding tests (tests/test_mesh.py) run in-process. Unsharded code places everything on
device 0 as before."""

import jax

jax.config.update("jax_num_cpu_devices", 4)
