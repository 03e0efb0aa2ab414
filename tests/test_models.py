"""Tests of softjax.models.vit and softjax.models.lora."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softjax.models import lora as lora_lib
from softjax.models import vit

QV = vit.LoRAConfig(rank=8, alpha=16.0, targets=("query", "value"))
NONE = vit.LoRAConfig(rank=8, alpha=16.0, targets=())
TINY_SHAPE = (8, 8, 1)
ATTN = "MultiHeadDotProductAttention_1"


@pytest.fixture(autouse=True)
def exact_float32_matmuls():
  """Full float32 matmuls, so the tight tolerances below also hold where the default
  precision is lower (TF32 on recent GPUs, bf16 passes on TPUs)."""
  with jax.default_matmul_precision("highest"):
    yield


def tiny_config(**overrides):
  kwargs = dict(image_size=8, channels=1, num_classes=10)
  kwargs.update(overrides)
  return vit.make_vit_config("tiny", **kwargs)


def count(tree):
  """Number of scalars in a tree of arrays or ShapeDtypeStructs."""
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def shapes(model, image_shape):
  """Variable shapes of `model` without computing anything."""
  def init(key):
    return model.init({"params": key, "lora": key}, jnp.zeros((1, *image_shape)))
  return jax.eval_shape(init, jax.random.key(0))


@jax.jit(static_argnums=0)
def apply(model, variables, images):
  """Jitted `model.apply` (one compile per model, reused across tests)."""
  return model.apply(variables, images)


def randomize(tree, seed, scale=0.1):
  """Replaces every leaf by Gaussian noise of the same shape.

  NumPy noise instead of jax.random: eager jax.random compiles once per leaf shape, which
  would dominate the run time of these small tests.
  """
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), jnp.float32), tree)


def vit_param_count(*, p, c, d, depth, mlp, seq, classes):
  """Hand count of a ViT's parameters."""
  embedding = p * p * c * d + d
  cls = d
  posemb = seq * d
  layer_norm = 2 * d
  attention = 4 * (d * d + d)
  mlp_block = (d * mlp + mlp) + (mlp * d + d)
  block = 2 * layer_norm + attention + mlp_block
  head = d * classes + classes
  return embedding + cls + posemb + depth * block + layer_norm + head


# ---------------------------------------------------------------------------- configs


def test_config_properties():
  cfg = vit.make_vit_config("cpu_small", image_size=28, channels=1, num_classes=10)
  assert (cfg.patch_size, cfg.width, cfg.depth, cfg.num_heads, cfg.mlp_dim) == (4, 128, 6, 4, 512)
  assert cfg.num_patches == 49
  assert cfg.seq_len == 50
  assert cfg.head_dim == 32


def test_unknown_variant_names_allowed():
  with pytest.raises(ValueError, match="tiny") as err:
    vit.make_vit_config("huge", image_size=8, channels=1, num_classes=10)
  assert "cpu_small" in str(err.value) and "B/16" in str(err.value)


def test_indivisible_image_size():
  with pytest.raises(ValueError, match="ViTConfig.image_size = 30 .* not a multiple of the patch"):
    vit.make_vit_config("cpu_small", image_size=30, channels=1, num_classes=10)


def test_bad_lora_target():
  with pytest.raises(ValueError, match="mlp"):
    vit.LoRAConfig(rank=4, alpha=8.0, targets=("query", "ffn"))


# ---------------------------------------------------------------------------- counts


def test_tiny_counts():
  model = vit.VisionTransformer(tiny_config(), QV)
  params = lora_lib.init_params(model, jax.random.key(0), TINY_SHAPE)
  lora = lora_lib.init_lora(model, jax.random.key(1), TINY_SHAPE)
  expected = vit_param_count(p=2, c=1, d=16, depth=2, mlp=32, seq=(8 // 2)**2 + 1, classes=10)
  assert expected == 5018
  assert count(params) == expected
  # rank 8 on query and value: r * (d_in + d_out) per layer, 2 layers per block, 2 blocks.
  assert lora_lib.lora_num_values(lora) == 2 * 2 * 8 * (16 + 16)


def test_cpu_small_counts():
  cfg = vit.make_vit_config("cpu_small", image_size=28, channels=1, num_classes=10)
  variables = shapes(vit.VisionTransformer(cfg, QV), (28, 28, 1))
  expected = vit_param_count(p=4, c=1, d=128, depth=6, mlp=512, seq=(28 // 4)**2 + 1,
                             classes=10)
  assert count(variables["params"]) == expected
  assert lora_lib.lora_num_values(variables["lora"]) == 6 * 2 * 8 * (128 + 128)


def test_b16_count():
  cfg = vit.make_vit_config("B/16", image_size=224, channels=3, num_classes=1000)
  variables = shapes(vit.VisionTransformer(cfg, NONE), (224, 224, 3))
  assert "lora" not in variables
  assert count(variables["params"]) == 86_567_656
  assert count(variables["params"]) == vit_param_count(
      p=16, c=3, d=768, depth=12, mlp=3072, seq=197, classes=1000)


# ---------------------------------------------------------------------------- layout


def test_checkpoint_layout():
  model = vit.VisionTransformer(tiny_config(), QV)
  variables = shapes(model, TINY_SHAPE)
  params = variables["params"]
  chex.assert_shape(params["embedding"]["kernel"], (2, 2, 1, 16))
  chex.assert_shape(params["cls"], (1, 1, 16))
  chex.assert_shape(params["Transformer"]["posembed_input"]["pos_embedding"], (1, 17, 16))
  block = params["Transformer"]["encoderblock_1"]
  assert set(block) == {"LayerNorm_0", ATTN, "LayerNorm_2", "MlpBlock_3"}
  for name in ("query", "key", "value"):
    assert set(block[ATTN][name]) == {"kernel", "bias"}
    chex.assert_shape(block[ATTN][name]["kernel"], (16, 2, 8))
    chex.assert_shape(block[ATTN][name]["bias"], (2, 8))
  chex.assert_shape(block[ATTN]["out"]["kernel"], (2, 8, 16))
  chex.assert_shape(block[ATTN]["out"]["bias"], (16,))
  chex.assert_shape(block["MlpBlock_3"]["Dense_0"]["kernel"], (16, 32))
  chex.assert_shape(block["MlpBlock_3"]["Dense_1"]["kernel"], (32, 16))
  assert set(params["Transformer"]["encoder_norm"]) == {"scale", "bias"}
  chex.assert_shape(params["head"]["kernel"], (16, 10))

  factors = variables["lora"]["Transformer"]["encoderblock_0"][ATTN]["query"]
  chex.assert_shape(factors["A"], (8, 16))
  chex.assert_shape(factors["B"], (16, 8))


def test_init_values():
  model = vit.VisionTransformer(tiny_config(), QV)
  params = lora_lib.init_params(model, jax.random.key(0), TINY_SHAPE)
  chex.assert_trees_all_equal(params["head"], jax.tree.map(jnp.zeros_like, params["head"]))
  cfg = vit.make_vit_config("cpu_small", image_size=28, channels=1, num_classes=10)
  lora = lora_lib.init_lora(vit.VisionTransformer(cfg, QV), jax.random.key(1), (28, 28, 1))
  a = np.stack([pair["A"] for _, pair in lora_lib.lora_layers(lora)])
  b = np.stack([pair["B"] for _, pair in lora_lib.lora_layers(lora)])
  assert np.all(b == 0)
  # std 1/sqrt(d_in) = 1/sqrt(128); 12 * 8 * 128 samples give a tight estimate.
  np.testing.assert_allclose(a.std(), 1 / np.sqrt(128), rtol=0.05)
  chex.assert_type(jax.tree.leaves((params, lora)), jnp.float32)


def test_init_lora_is_deterministic_and_key_dependent():
  model = vit.VisionTransformer(tiny_config(), QV)
  one = lora_lib.init_lora(model, jax.random.key(3), TINY_SHAPE)
  chex.assert_trees_all_equal(one, lora_lib.init_lora(model, jax.random.key(3), TINY_SHAPE))
  other = lora_lib.init_lora(model, jax.random.key(4), TINY_SHAPE)
  assert not np.allclose(jax.tree.leaves(one)[0], jax.tree.leaves(other)[0])


def test_targets_subset():
  layers = lambda targets: {
      path for path, _, _ in lora_lib.lora_layer_dims(
          shapes(vit.VisionTransformer(tiny_config(), vit.LoRAConfig(4, 8.0, targets)),
                 TINY_SHAPE).get("lora", {}))}
  prefix = lambda i: f"Transformer/encoderblock_{i}/"
  assert layers(("key",)) == {prefix(i) + f"{ATTN}/key" for i in range(2)}
  assert layers(("mlp",)) == {prefix(i) + f"MlpBlock_3/Dense_{j}" for i in range(2)
                              for j in range(2)}
  assert layers(("query", "out")) == {prefix(i) + f"{ATTN}/{n}" for i in range(2)
                                      for n in ("query", "out")}
  assert layers(()) == set()


def test_layer_dims():
  model = vit.VisionTransformer(tiny_config(), vit.LoRAConfig(4, 8.0, ("out", "mlp")))
  dims = lora_lib.lora_layer_dims(shapes(model, TINY_SHAPE)["lora"])
  assert dims == [
      ("Transformer/encoderblock_0/MlpBlock_3/Dense_0", 16, 32),
      ("Transformer/encoderblock_0/MlpBlock_3/Dense_1", 32, 16),
      (f"Transformer/encoderblock_0/{ATTN}/out", 16, 16),
      ("Transformer/encoderblock_1/MlpBlock_3/Dense_0", 16, 32),
      ("Transformer/encoderblock_1/MlpBlock_3/Dense_1", 32, 16),
      (f"Transformer/encoderblock_1/{ATTN}/out", 16, 16),
  ]
  assert lora_lib.lora_scale(model.lora) == 2.0


def test_split_join_head():
  params = lora_lib.init_params(vit.VisionTransformer(tiny_config()), jax.random.key(0),
                                TINY_SHAPE)
  frozen, head = lora_lib.split_head(params)
  assert "head" not in frozen and set(head) == {"kernel", "bias"}
  chex.assert_trees_all_equal(lora_lib.join_head(frozen, head), params)


# ---------------------------------------------------------------------------- forward


@pytest.fixture(scope="module")
def tiny_setup():
  """Params with a random head, LoRA factors at init, and a random input batch."""
  plain = vit.VisionTransformer(tiny_config(), NONE)
  params = lora_lib.init_params(plain, jax.random.key(0), TINY_SHAPE)
  # A zero head would make every logit zero and every comparison trivial.
  frozen, head = lora_lib.split_head(params)
  params = lora_lib.join_head(frozen, randomize(head, seed=1, scale=1.0))
  images = randomize(jnp.zeros((4, *TINY_SHAPE)), seed=2, scale=1.0)
  return plain, params, images


@pytest.mark.parametrize("targets", [("query", "value"), ("key", "out", "mlp")])
def test_lora_at_init_equals_plain_and_merge_matches(tiny_setup, targets):
  plain, params, images = tiny_setup
  cfg = vit.LoRAConfig(rank=4, alpha=8.0, targets=targets)
  adapted = vit.VisionTransformer(plain.config, cfg)
  lora = lora_lib.init_lora(adapted, jax.random.key(3), TINY_SHAPE)
  base = apply(plain, {"params": params}, images)
  chex.assert_shape(base, (4, 10))
  chex.assert_type(base, jnp.float32)
  assert float(jnp.abs(base).max()) > 0
  chex.assert_trees_all_close(apply(adapted, {"params": params, "lora": lora}, images), base,
                              atol=1e-6)

  # Random B makes the adapter change the function; merging must reproduce it exactly.
  lora = jax.tree.map_with_path(
      lambda path, x: randomize(x, seed=4) if path[-1].key == "B" else x, lora)
  out = apply(adapted, {"params": params, "lora": lora}, images)
  assert not np.allclose(out, base, atol=1e-3)
  merged = lora_lib.merge_lora(params, lora, cfg)
  chex.assert_trees_all_close(apply(plain, {"params": merged}, images), out, atol=1e-5,
                              rtol=1e-5)


def test_rank_component_is_column_of_b_and_row_of_a(tiny_setup):
  """Zeroing column i of B and row i of A removes exactly component i of the update."""
  plain, params, images = tiny_setup
  cfg = vit.LoRAConfig(rank=4, alpha=8.0, targets=("query",))
  adapted = vit.VisionTransformer(plain.config, cfg)
  lora = randomize(lora_lib.init_lora(adapted, jax.random.key(3), TINY_SHAPE), seed=5)
  keep = jnp.array([1.0, 0.0, 1.0, 1.0])
  dropped = jax.tree.map_with_path(
      lambda path, x: x * keep[:, None] if path[-1].key == "A" else x * keep[None, :], lora)
  merged = lora_lib.merge_lora(params, dropped, cfg)
  for path, pair in lora_lib.lora_layers(lora):
    keys = path.split("/")
    w0 = params
    w = merged
    for key in keys:
      w0, w = w0[key], w[key]
    delta = (w["kernel"] - w0["kernel"]).reshape(16, 16)
    b, a = pair["B"], pair["A"]
    expected = 2.0 * sum(jnp.outer(a[i], b[:, i]) for i in (0, 2, 3))
    chex.assert_trees_all_close(delta, expected, atol=1e-5)


def test_jit_and_batch_shapes(tiny_setup):
  plain, params, _ = tiny_setup
  images = jnp.ones((3, *TINY_SHAPE))
  out = apply(plain, {"params": params}, images)
  chex.assert_shape(out, (3, 10))
  chex.assert_tree_all_finite(out)


# ---------------------------------------------------------------------------- reference


class _RefBlock(nn.Module):
  """Encoder block written with stock Flax layers, as in the public ViT code."""
  heads: int
  mlp: int

  @nn.compact
  def __call__(self, x):
    # Current Flax numbers auto-names per class, so the checkpoint names are spelled out.
    y = nn.LayerNorm(epsilon=1e-6, name="LayerNorm_0")(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.heads, name=ATTN)(y, y)
    x = x + y
    y = nn.LayerNorm(epsilon=1e-6, name="LayerNorm_2")(x)
    y = _RefMlp(self.mlp, name="MlpBlock_3")(y)
    return x + y


class _RefMlp(nn.Module):
  """MLP block written with stock Flax layers (auto-named Dense_0, Dense_1)."""
  mlp: int

  @nn.compact
  def __call__(self, x):
    h = nn.gelu(nn.Dense(self.mlp)(x))
    return nn.Dense(x.shape[-1])(h)


def test_matches_stock_flax_layers(tiny_setup):
  """Our projections compute what flax's MultiHeadDotProductAttention computes on the same
  checkpoint tensors, so public weights mean the same thing here."""
  plain, params, _ = tiny_setup
  params = randomize(params, seed=7, scale=0.3)
  block_params = params["Transformer"]["encoderblock_0"]
  x = randomize(jnp.zeros((2, 17, 16)), seed=8, scale=1.0)
  ref = apply(_RefBlock(heads=2, mlp=32), {"params": block_params}, x)
  ours = apply(vit.EncoderBlock(plain.config, NONE), {"params": block_params}, x)
  chex.assert_trees_all_close(ours, ref, atol=1e-5)


def test_dataclass_rules_name_the_dataclass_field():
  with pytest.raises(ValueError, match=r"^LoRAConfig\.rank = 0 is invalid"):
    vit.LoRAConfig(rank=0, alpha=1.0, targets=("query",))
  with pytest.raises(ValueError, match=r"^LoRAConfig\.targets = .* names a projection twice"):
    vit.LoRAConfig(rank=2, alpha=1.0, targets=("query", "query"))
  with pytest.raises(ValueError, match=r"^ViTConfig\.width = 10 .* multiple of num_heads \(4\)"):
    vit.ViTConfig(image_size=8, channels=1, patch_size=4, width=10, depth=1, num_heads=4,
                  mlp_dim=8, num_classes=2)
