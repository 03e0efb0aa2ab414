"""Vision Transformer with optional LoRA adapters, in Flax Linen.

The parameter tree of `VisionTransformer` matches the flat `.npz` layout of the public ViT
checkpoints (google-research/vision_transformer, big_vision) one to one, so a pretrained
checkpoint loads without any renaming (see `softjax.models.checkpoint`).

LoRA factors are kept out of the `'params'` collection: they live in their own `'lora'`
collection at the module path of the projection they adapt. That keeps the frozen backbone and
the trainable factors as two separate pytrees, which is what lets the federated code
differentiate, vmap and communicate only the factors.

Shapes: `B` batch, `L` sequence length (patches + cls token), `D` width, `N` heads,
`H` head dimension.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from softjax.config import rules
from softjax.config.choices import LORA_TARGETS  # noqa: F401  (re-exported)

Array = jax.Array
Initializer = Callable[..., Array]

# Target names accepted by `LoRAConfig.targets`. "query".."out" are the four attention
# projections; "mlp" adapts both Dense layers of the MLP block.

# Architecture sizes by name. "tiny" is for unit tests on 8x8 digits, "cpu_small" for 28x28
# Fashion-MNIST on a CPU, "B/16" is the ViT-Base/16 of the public checkpoints.
VARIANTS: dict[str, dict[str, int]] = {
    "tiny": dict(patch_size=2, width=16, depth=2, num_heads=2, mlp_dim=32),
    "cpu_small": dict(patch_size=4, width=128, depth=6, num_heads=4, mlp_dim=512),
    "cpu_fast": dict(patch_size=7, width=128, depth=4, num_heads=4, mlp_dim=512),
    "B/16": dict(patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072),
}

_LN_EPSILON = 1e-6  # The public ViT checkpoints were trained with this epsilon.


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Static architecture of a Vision Transformer.

  Frozen (hence hashable) so that a model built from it can be a static jit argument.

  Attributes:
    image_size: side of the square input image, in pixels.
    channels: number of input channels.
    patch_size: side of a square patch; must divide `image_size`.
    width: token embedding size D.
    depth: number of encoder blocks.
    num_heads: attention heads N; must divide `width`.
    mlp_dim: hidden size of the MLP block.
    num_classes: size of the classifier output.
  """

  image_size: int
  channels: int
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  num_classes: int

  def __post_init__(self):
    for field in dataclasses.fields(self):
      rules.integer(field.name, getattr(self, field.name), 1, owner="ViTConfig")
    rules.patch_grid(self.image_size, self.patch_size, "image_size", self.image_size,
                     owner="ViTConfig")
    rules.check(self.width % self.num_heads == 0, "width", self.width,
                f"must be a multiple of num_heads ({self.num_heads})", owner="ViTConfig")

  @property
  def grid_size(self) -> int:
    """Number of patches along one side of the image."""
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    """Number of patch tokens."""
    return self.grid_size**2

  @property
  def seq_len(self) -> int:
    """Sequence length seen by the encoder: the patches plus one cls token."""
    return self.num_patches + 1

  @property
  def head_dim(self) -> int:
    """Per-head size H = width / num_heads."""
    return self.width // self.num_heads


def make_vit_config(variant: str, *, image_size: int, channels: int,
                    num_classes: int) -> ViTConfig:
  """Builds a `ViTConfig` from a named architecture in `VARIANTS`.

  Args:
    variant: one of the keys of `VARIANTS`.
    image_size: side of the square input image.
    channels: number of input channels.
    num_classes: classifier output size.

  Returns:
    The validated configuration.

  Raises:
    ValueError: unknown variant, or `image_size` not divisible by the variant's patch size.
  """
  if variant not in VARIANTS:
    raise ValueError(
        f"Unknown ViT variant {variant!r}; allowed: {', '.join(sorted(VARIANTS))}.")
  return ViTConfig(image_size=image_size, channels=channels, num_classes=num_classes,
                   **VARIANTS[variant])


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """Which projections get a LoRA adapter, and its size.

  Attributes:
    rank: number of rank components r (>= 1).
    alpha: LoRA scale numerator; the update is multiplied by alpha / rank.
    targets: subset of `LORA_TARGETS`; empty means no adapter (head-only fine-tuning).
  """

  rank: int
  alpha: float
  targets: tuple[str, ...]

  def __post_init__(self):
    rules.integer("rank", self.rank, 1, owner="LoRAConfig")
    # A list would make the config unhashable, so normalise to a tuple.
    object.__setattr__(self, "targets", tuple(self.targets))
    rules.lora_targets("targets", self.targets, owner="LoRAConfig")

  def rank_for(self, target: str) -> int:
    """Returns the adapter rank of `target`, 0 when it is not adapted."""
    return self.rank if target in self.targets else 0


# Default for `VisionTransformer.lora`: a plain model without any adapter.
NO_LORA = LoRAConfig(rank=1, alpha=1.0, targets=())


def _xavier_uniform(in_ndim: int, out_ndim: int) -> Initializer:
  """Xavier-uniform init for a kernel [*in_shape, *out_shape] with multi-axis fans."""
  return nn.initializers.xavier_uniform(
      in_axis=tuple(range(in_ndim)), out_axis=tuple(range(in_ndim, in_ndim + out_ndim)))


class LoRAProjection(nn.Module):
  """Linear map over the trailing axes, with an optional low-rank additive adapter.

  The kernel has shape `[*in_shape, *features]` where `in_shape` is the last `in_ndim` axes
  of the input, so it stores the attention projections in the checkpoint layout
  (e.g. query `[D, N, H]`, out `[N, H, D]`). `kernel` and `bias` are declared directly in
  this module, so a module named `query` owns `query/kernel` with no extra nesting.

  Attributes:
    features: output shape.
    in_ndim: number of trailing input axes contracted.
    rank: LoRA rank; 0 disables the adapter (no `'lora'` variables are created).
    alpha: LoRA scale numerator.
    bias_init: initializer of the bias.
  """

  features: tuple[int, ...]
  in_ndim: int = 1
  rank: int = 0
  alpha: float = 1.0
  bias_init: Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Applies `y = W0 x + b + (alpha / r) B (A x)`.

    Args:
      x: input `[..., *in_shape]`.

    Returns:
      Output `[..., *features]`.

    References:
      ALGORITHM.md section 1 (LoRA forward `y = W0 x + (alpha / r) B (A x)`).
    """
    batch_shape = x.shape[:-self.in_ndim]
    in_shape = x.shape[-self.in_ndim:]
    d_in, d_out = math.prod(in_shape), math.prod(self.features)
    kernel = self.param("kernel", _xavier_uniform(self.in_ndim, len(self.features)),
                        in_shape + tuple(self.features), jnp.float32)
    bias = self.param("bias", self.bias_init, tuple(self.features), jnp.float32)

    x_flat = x.reshape(batch_shape + (d_in,))
    y = x_flat @ kernel.reshape(d_in, d_out)
    if self.rank > 0:
      y = y + self._adapter(x_flat, d_in, d_out)
    return y.reshape(batch_shape + tuple(self.features)) + bias

  def _adapter(self, x_flat: Array, d_in: int, d_out: int) -> Array:
    """Low-rank update `(alpha / r) B (A x)` on flattened inputs.

    Args:
      x_flat: input `[..., d_in]`.
      d_in: flattened input size.
      d_out: flattened output size.

    Returns:
      The update `[..., d_out]`.

    References:
      ALGORITHM.md section 1 (A Gaussian with std 1/sqrt(d_in), B zero).
    """
    def init_a():
      std = 1.0 / math.sqrt(d_in)
      return std * jax.random.normal(self.make_rng("lora"), (self.rank, d_in), jnp.float32)

    a = self.variable("lora", "A", init_a).value
    b = self.variable("lora", "B", jnp.zeros, (d_out, self.rank), jnp.float32).value
    # Two thin products cost r * (d_in + d_out) per token; forming B @ A would cost
    # d_in * d_out and break the "never form B A" property the scores rely on.
    return (self.alpha / self.rank) * ((x_flat @ a.T) @ b.T)


class SelfAttention(nn.Module):
  """Multi-head self-attention with checkpoint-compatible, LoRA-capable projections.

  Attributes:
    num_heads: N.
    lora: adapter configuration (targets "query", "key", "value", "out").
  """

  num_heads: int
  lora: LoRAConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Attends over the sequence.

    Args:
      x: tokens `[B, L, D]`.

    Returns:
      Tokens `[B, L, D]`.
    """
    width = x.shape[-1]
    head_dim = width // self.num_heads

    def proj(name, features, in_ndim):
      return LoRAProjection(features=features, in_ndim=in_ndim,
                            rank=self.lora.rank_for(name), alpha=self.lora.alpha, name=name)

    q, k, v = (proj(name, (self.num_heads, head_dim), 1)(x)
               for name in ("query", "key", "value"))
    # jax.nn.dot_product_attention scales by 1/sqrt(H) like the reference ViT, and can pick a
    # fused kernel on accelerators.
    y = jax.nn.dot_product_attention(q, k, v)
    return proj("out", (width,), 2)(y)


class MlpBlock(nn.Module):
  """Two Dense layers with a GELU in between (`Dense_0`, `Dense_1`).

  Attributes:
    mlp_dim: hidden size.
    lora: adapter configuration (target "mlp" adapts both layers).
  """

  mlp_dim: int
  lora: LoRAConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Applies the MLP.

    Args:
      x: tokens `[B, L, D]`.

    Returns:
      Tokens `[B, L, D]`.
    """
    rank = self.lora.rank_for("mlp")
    # Tiny bias init as in the reference ViT.
    bias_init = nn.initializers.normal(stddev=1e-6)
    h = LoRAProjection(features=(self.mlp_dim,), rank=rank, alpha=self.lora.alpha,
                       bias_init=bias_init, name="Dense_0")(x)
    # The public checkpoints were trained with the tanh approximation (flax's default).
    h = nn.gelu(h, approximate=True)
    return LoRAProjection(features=(x.shape[-1],), rank=rank, alpha=self.lora.alpha,
                          bias_init=bias_init, name="Dense_1")(h)


class EncoderBlock(nn.Module):
  """Pre-LayerNorm transformer block.

  Attributes:
    config: architecture.
    lora: adapter configuration.
  """

  config: ViTConfig
  lora: LoRAConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Applies attention and MLP, each with a residual connection.

    Args:
      x: tokens `[B, L, D]`.

    Returns:
      Tokens `[B, L, D]`.
    """
    # Explicit names reproduce the checkpoint's auto-numbered layout.
    y = nn.LayerNorm(epsilon=_LN_EPSILON, name="LayerNorm_0")(x)
    y = SelfAttention(self.config.num_heads, self.lora, name="MultiHeadDotProductAttention_1")(y)
    x = x + y
    y = nn.LayerNorm(epsilon=_LN_EPSILON, name="LayerNorm_2")(x)
    y = MlpBlock(self.config.mlp_dim, self.lora, name="MlpBlock_3")(y)
    return x + y


class Encoder(nn.Module):
  """Position embedding, encoder blocks and final LayerNorm (`Transformer/...`).

  Attributes:
    config: architecture.
    lora: adapter configuration.
  """

  config: ViTConfig
  lora: LoRAConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Encodes the token sequence.

    Args:
      x: tokens `[B, L, D]` including the cls token.

    Returns:
      Normalised tokens `[B, L, D]`.
    """
    x = AddPositionEmbs(name="posembed_input")(x)
    for i in range(self.config.depth):
      x = EncoderBlock(self.config, self.lora, name=f"encoderblock_{i}")(x)
    return nn.LayerNorm(epsilon=_LN_EPSILON, name="encoder_norm")(x)


class AddPositionEmbs(nn.Module):
  """Adds a learned position embedding `pos_embedding [1, L, D]`."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Adds the embedding.

    Args:
      x: tokens `[B, L, D]`.

    Returns:
      Tokens `[B, L, D]`.
    """
    pos = self.param("pos_embedding", nn.initializers.normal(stddev=0.02),
                     (1,) + x.shape[1:], jnp.float32)
    return x + pos


class VisionTransformer(nn.Module):
  """ViT classifier (cls-token pooling) with optional LoRA adapters.

  Variables: `'params'` in the public ViT checkpoint layout (head initialised to zeros, as in
  ViT fine-tuning); `'lora'` with `{A: [r, d_in], B: [d_out, r]}` at the path of each adapted
  projection (only when `lora.targets` is not empty; initialising it needs an rng stream
  named `'lora'`).

  Attributes:
    config: architecture.
    lora: adapter configuration; the default adapts nothing.
  """

  config: ViTConfig
  lora: LoRAConfig = NO_LORA

  @nn.compact
  def __call__(self, images: Array) -> Array:
    """Classifies a batch of images.

    Args:
      images: float32 `[B, H, W, C]` with H = W = `config.image_size`.

    Returns:
      float32 logits `[B, num_classes]`.
    """
    cfg = self.config
    x = jnp.asarray(images, jnp.float32)
    x = nn.Conv(cfg.width, (cfg.patch_size, cfg.patch_size),
                strides=(cfg.patch_size, cfg.patch_size), padding="VALID",
                name="embedding")(x)
    batch = x.shape[0]
    x = x.reshape(batch, -1, cfg.width)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, cfg.width), jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, cfg.width)), x], axis=1)
    x = Encoder(cfg, self.lora, name="Transformer")(x)
    return nn.Dense(cfg.num_classes, kernel_init=nn.initializers.zeros,
                    bias_init=nn.initializers.zeros, name="head")(x[:, 0])

