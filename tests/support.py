"""Helpers shared by the test modules (plain functions and constants; fixtures are in
conftest.py). Test modules import from here, never from each other."""

import gzip
import os

import jax
import jax.numpy as jnp
import numpy as np

from configs import testing
from softjax.data import partition as partition_lib
from softjax.federated import types as fl_types
from softjax.models import lora as lora_lib
from softjax.models import vit
from softjax.run import metrics as metrics_lib
from softjax.sparsify import payload
from softjax.tsfa import controller as controller_lib
from softjax.wireless import channel as channel_lib
from softjax.wireless import link as link_lib


def linear_apply(frozen, trainable, images):
  """logits = flatten(x) @ W: a model whose one-step SGD update is easy to write by hand."""
  del frozen
  return images.reshape(images.shape[0], -1) @ trainable.head["w"]


def make_data(sizes, num_classes=3, side=2, seed=0):
  rng = np.random.default_rng(seed)
  m = sum(sizes)
  images = rng.integers(0, 256, size=(m, side, side, 1), dtype=np.uint8)
  labels = rng.integers(0, num_classes, size=m).astype(np.int32)
  bounds = np.cumsum([0] + list(sizes))
  clients = [np.arange(bounds[i], bounds[i + 1]) for i in range(len(sizes))]
  table = partition_lib.pad_client_indices(clients)
  return fl_types.FederatedData(images=jnp.asarray(images), labels=jnp.asarray(labels),
                                 table=jnp.asarray(table.indices),
                                 counts=jnp.asarray(table.counts)), images, labels, clients


def tiny_setup(rank=4, targets=("query", "value"), num_clients=4, seed=0):
  config = vit.make_vit_config("tiny", image_size=8, channels=1, num_classes=5)
  model = vit.VisionTransformer(config, vit.LoRAConfig(rank=rank, alpha=4.0, targets=targets))
  params = lora_lib.init_params(model, jax.random.key(seed), (8, 8, 1))
  frozen, head = lora_lib.split_head(params)
  lora = lora_lib.init_lora(model, jax.random.key(seed + 1), (8, 8, 1))
  # A non-zero head and B, so every trainable leaf gets a gradient from the first step.
  head = jax.tree.map(lambda h: 0.1 * jnp.ones_like(h), head)
  lora = jax.tree.map(lambda a: a + 0.01, lora)

  def apply_fn(frozen, trainable, images):
    return model.apply({"params": lora_lib.join_head(frozen, trainable.head),
                        "lora": trainable.lora}, images)

  data, *_ = make_data([12, 9, 15, 10][:num_clients], num_classes=5, side=8, seed=seed)
  state = fl_types.init_state(lora, head, num_clients=num_clients, error_feedback=False)
  return apply_fn, frozen, state, data


N, K, RANK = 20, 5, 8  # clients, clients per round, rank of the controller tests
LAYERS = [(128, 128)] * 12


HEAD = 1290


def make_link(bandwidth_hz=1e6, seed=0):
  cfg = channel_lib.ChannelConfig(bandwidth_hz=bandwidth_hz)
  beta = channel_lib.large_scale_gain(channel_lib.place_clients(N, cfg, seed), cfg, seed)
  return link_lib.Link(cfg, beta, np.random.default_rng(99).uniform(1e11, 3e11, N))


def bits_at(keep_ratio):
  return payload.lora_upload_bits(LAYERS, rank=RANK, kept=max(1, int(np.ceil(keep_ratio * RANK))),
                                  value_bits=32, head_params=HEAD)


def controller_state(queue=0.0, fallbacks=0):
  """A ControllerState with the given queue Q_t and failure count."""
  return controller_lib.ControllerState(queue=np.asarray(queue, np.float64),
                                        fallbacks=np.asarray(fallbacks, np.int64))


def make_controller(mode, link=None, fraction=0.6, **kwargs):
  link = link or make_link()
  compute = np.random.default_rng(99).uniform(0.1, 0.3, N)
  tbar = fraction * link_lib.dense_budget_s(bits_at(1.0), link.beta, compute, link.channel, K)
  spec = controller_lib.ControllerSpec(mode=mode, seed=0, tbar_s=tbar, rank=RANK,
                                       clients_per_round=K, **kwargs)
  return controller_lib.LatencyController(spec, link, compute, bits_at)


def make_testing_config():
  from configs import testing
  return testing.get_config().unlock()


def write_idx(path, array, type_code, dtype):
  """Writes a gzip idx file by hand, independently of the reader under test."""
  header = bytes([0, 0, type_code, array.ndim]) + np.asarray(
      array.shape, ">u4"
  ).tobytes()
  with gzip.open(path, "wb") as f:
    f.write(header + np.asarray(array, dtype).tobytes())


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


ROUNDS = 6


def with_overrides(config, overrides):
  """`config` (unlocked) with `{"section.field": value}` set."""
  for key, value in overrides.items():
    section, leaf = key.split(".")
    config[section][leaf] = value
  return config


def quickstart_with(overrides):
  """configs/quickstart.py with `{"section.field": value}` set."""
  from softjax import config as config_lib
  return with_overrides(config_lib.load("configs/quickstart.py").unlock(), overrides)


def make_config(cache_dir, rounds=ROUNDS, **overrides):
  config = testing.get_config(f"rounds={rounds}").unlock()
  config.model.cache_dir = cache_dir
  return with_overrides(config, overrides)


def comparable(rows):
  """Rows without wall-clock fields: what must match bit for bit between runs."""
  return [{k: v for k, v in r.items() if k not in metrics_lib.TIMING_FIELDS} for r in rows]


_CACHE_VARS = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
               "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES")


def compilation_cache_env(path):
  """The environment that points a JAX process at the persistent compilation cache in path,
  caching every program however small or quick to compile."""
  return dict(zip(_CACHE_VARS, (path, "0", "-1")))


def env_without_compilation_cache(**extra):
  """os.environ without the suite's compilation cache (conftest.py), plus extra: for a
  subprocess that is killed mid-run (it could leave a cut-off entry that later reads warn
  about), that runs beside another one, or whose compilation is what it measures."""
  env = {k: v for k, v in os.environ.items() if k not in _CACHE_VARS}
  return {**env, **extra}


def env_for_timing(**extra):
  """The environment of a subprocess that times programs: no compilation cache, and XLA's
  optimizations on, which the suite otherwise turns off (conftest.py), so that it times what
  users run."""
  return env_without_compilation_cache(JAX_DISABLE_MOST_OPTIMIZATIONS="0", **extra)
