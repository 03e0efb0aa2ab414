"""The model as the round sees it: apply_fn over (frozen, trainable), the LoRA ViT at a rank, and
the training FLOPs of one example (the wireless compute-time model's input).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax

from softjax import config as config_lib
from softjax.models import lora as lora_lib
from softjax.models import vit

# apply_fn(frozen_params, trainable, images float32 [B, H, W, C]) -> logits [B, classes]
ApplyFn = Callable[[Any, Any, jax.Array], jax.Array]


def make_apply_fn(model: vit.VisionTransformer) -> ApplyFn:
  """apply_fn(frozen, trainable, images) -> logits, resizing images to the model's input size."""
  size = model.config.image_size

  def apply_fn(frozen, trainable, images):
    if images.shape[1:3] != (size, size):
      images = jax.image.resize(images, (images.shape[0], size, size, images.shape[3]),
                                "bilinear")
    params = lora_lib.join_head(frozen, trainable.head)
    return model.apply({"params": params, "lora": trainable.lora}, images)

  return apply_fn


def make_model(config, vit_config: vit.ViTConfig, rank: int) -> vit.VisionTransformer:
  """The run's LoRA ViT at `rank`; a rank chosen by the offline stage keeps the config's adapter
  scale alpha / r."""
  alpha = config.lora.alpha * rank / config.lora.rank
  return vit.VisionTransformer(vit_config, vit.LoRAConfig(
      rank=rank, alpha=alpha, targets=config_lib.lora_targets(config)))


def flops_per_example(*, seq_len: int, width: int, depth: int, mlp_dim: int, num_classes: int,
                      patch_dim: int = 0, lora_rank: int = 0,
                      lora_layer_dims: Sequence[tuple[int, int]] = ()) -> float:
  """Training FLOPs of one example through a ViT with frozen weights and LoRA adapters.

  Approximation [choice]: count only matrix multiplications (layer norms, softmax, GELU and
  residual adds are elementwise and small next to them), at 2 FLOPs per multiply-accumulate.
  - forward: patch embedding, per block the q/k/v/out projections (4 L D^2), the attention
    scores and weighted sum (2 L^2 D) and the MLP (2 L D M), the LoRA paths
    (L r (d_in + d_out) per adapted matrix) and the head on the cls token;
  - backward: the activation gradient flows back through every block (one more pass of the
    block MACs, LoRA paths included), but weight gradients are needed only for the LoRA
    factors and the head. The frozen patch embedding lies below every adapter, so no gradient
    goes through it. The weight gradient of a frozen matrix would cost another forward pass,
    which is why the total is about 2x the forward FLOPs rather than the usual 3x of full
    fine-tuning. It assumes the lowest block carries adapters (true for the default targets).

  Args:
    seq_len: tokens through the encoder (patches + cls token).
    width: model width D.
    depth: number of encoder blocks.
    mlp_dim: MLP hidden size M.
    num_classes: head outputs.
    patch_dim: values per patch (patch_size^2 * channels); 0 skips the embedding cost.
    lora_rank: r (0: no adapters).
    lora_layer_dims: (d_in, d_out) of every adapted matrix over all blocks (the same list
      `payload.lora_upload_bits` takes).

  Returns:
    FLOPs per training example (forward + backward).

  References: ALGORITHM.md section 4.
  """
  tokens = seq_len
  block_macs = depth * (4 * tokens * width ** 2 + 2 * tokens ** 2 * width
                        + 2 * tokens * width * mlp_dim)
  lora_macs = tokens * lora_rank * sum(d_in + d_out for d_in, d_out in lora_layer_dims)
  head_macs = width * num_classes
  embed_macs = (seq_len - 1) * patch_dim * width
  forward = embed_macs + block_macs + lora_macs + head_macs
  # Activation gradients flow back from the head through every block and LoRA path; weight
  # gradients are taken for the trainable parts (LoRA factors, head) only.
  activation_grads = head_macs + block_macs + lora_macs
  weight_grads = head_macs + lora_macs
  backward = activation_grads + weight_grads
  return 2.0 * float(forward + backward)


def model_flops_per_example(vit_config: vit.ViTConfig, rank: int,
                            layer_dims: Sequence[tuple[int, int]]) -> float:
  """Training FLOPs of one example of this run's model (`flops_per_example` at its sizes)."""
  c = vit_config
  return flops_per_example(
      seq_len=(c.image_size // c.patch_size) ** 2 + 1, width=c.width, depth=c.depth,
      mlp_dim=c.mlp_dim, num_classes=c.num_classes, patch_dim=c.patch_size ** 2 * c.channels,
      lora_rank=rank, lora_layer_dims=layer_dims)
