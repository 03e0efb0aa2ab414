"""Pure functions on the parameter and LoRA pytrees of `VisionTransformer`.

The LoRA tree mirrors the module tree: every adapted projection is a leaf-level dict
`{"A": [r, d_in], "B": [d_out, r]}` at the projection's path, e.g.
`lora["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_1"]["query"]`.
Rank component i of a layer is (column i of B, row i of A).

Layer order: every function that lists layers uses `jax.tree` flattening order (dict keys
sorted as strings, so "encoderblock_10" comes before "encoderblock_2"). It is deterministic and
the same order `jax.tree.leaves` gives the factors, so per-layer arrays built from it line up
with the tree.
"""

from __future__ import annotations

from collections.abc import Mapping
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from softjax.models.vit import NO_LORA, LoRAConfig, VisionTransformer

PyTree = Any
HEAD = "head"  # Name of the classifier sub-tree in the params collection.


@functools.partial(jax.jit, static_argnames=("model", "image_shape", "collection"))
def _init_collection(model: VisionTransformer, key: jax.Array, image_shape: tuple[int, ...],
                     collection: str) -> PyTree:
  """Initialises the model and returns one variable collection.

  Under jit the parts of the init that do not feed the returned collection (the other
  collection, the forward pass) are dead code and are never computed.
  """
  dummy = jnp.zeros((1, *image_shape), jnp.float32)
  # One key for both streams is fine: only one collection leaves this function.
  variables = model.init({"params": key, "lora": key}, dummy)
  return variables.get(collection, {})


def init_lora(model: VisionTransformer, key: jax.Array,
              image_shape: tuple[int, int, int]) -> PyTree:
  """Initial LoRA factors (A Gaussian with std 1/sqrt(d_in), B zero).

  Args:
    model: the model whose `lora` config names the targets.
    key: PRNG key of the `'lora'` stream.
    image_shape: `(H, W, C)` of one input image.

  Returns:
    The `'lora'` collection; `{}` when the model has no targets.

  References:
    ALGORITHM.md section 1 (LoRA initialisation).
  """
  return _init_collection(model, key, tuple(image_shape), "lora")


def init_params(model: VisionTransformer, key: jax.Array,
                image_shape: tuple[int, int, int]) -> PyTree:
  """Initial backbone parameters with a zero classifier head.

  Args:
    model: the model.
    key: PRNG key of the `'params'` stream.
    image_shape: `(H, W, C)` of one input image.

  Returns:
    The `'params'` collection.
  """
  # Params do not depend on the adapters; dropping them shares one compiled init between
  # all LoRA configurations of an architecture.
  plain = model.clone(lora=NO_LORA)
  return _init_collection(plain, key, tuple(image_shape), "params")


def lora_scale(lora_cfg: LoRAConfig) -> float:
  """LoRA scale alpha / r.

  Args:
    lora_cfg: adapter configuration.

  Returns:
    The scalar multiplying `B A`.

  References:
    ALGORITHM.md section 1 (`y = W0 x + (alpha / r) B (A x)`).
  """
  return float(lora_cfg.alpha) / lora_cfg.rank


def is_factor_pair(node: Any) -> bool:
  """True for the `{"A", "B"}` dict of one adapted layer."""
  return isinstance(node, Mapping) and set(node.keys()) == {"A", "B"}


def is_fold(node: Any) -> bool:
  """True for the `{"W"}` dict of one adapted layer's fold (`zero_folds`)."""
  return isinstance(node, Mapping) and set(node.keys()) == {"W"}


def factor_pairs(lora_tree: PyTree) -> tuple[list[dict[str, jax.Array]], Any]:
  """The `{"A", "B"}` dicts of a LoRA tree in `jax.tree` order, and the treedef above them."""
  pairs, treedef = jax.tree.flatten(lora_tree, is_leaf=is_factor_pair)
  bad = [type(p).__name__ for p in pairs if not is_factor_pair(p)]
  if bad:
    raise ValueError(f"LoRA tree has leaves outside {{'A', 'B'}} dicts: {bad[:3]}.")
  return pairs, treedef


def scale_components(lora_tree: PyTree, b_scale: jax.Array, a_scale: jax.Array) -> PyTree:
  """Every layer's B with its columns scaled by `b_scale` and A with its rows by `a_scale`:
  each a scalar (the whole factor) or [r] (per rank component)."""
  pairs, treedef = factor_pairs(lora_tree)
  a_scale = jnp.expand_dims(jnp.asarray(a_scale), -1)  # [r] -> [r, 1]: one value per row of A
  return jax.tree.unflatten(treedef, [{"A": p["A"] * a_scale, "B": p["B"] * b_scale}
                                      for p in pairs])


def b_factors(lora_tree: PyTree) -> PyTree:
  """The tree's B factors alone: every `{"A", "B"}` dict replaced by `{"B": B}` (leaves may
  carry leading axes, e.g. a per-client [N] store)."""
  return jax.tree.map(lambda pair: {"B": pair["B"]}, lora_tree, is_leaf=is_factor_pair)


def with_b_factors(lora_tree: PyTree, b_tree: PyTree) -> PyTree:
  """`lora_tree` with its B factors taken from `b_tree` (shaped as `b_factors` gives)."""
  return jax.tree.map(lambda pair, b: {"A": pair["A"], "B": b["B"]}, lora_tree, b_tree,
                      is_leaf=is_factor_pair)


def zero_folds(lora_tree: PyTree) -> PyTree:
  """A fold per adapted layer, zero: every `{"A", "B"}` dict replaced by `{"W": [d_out, d_in]}`
  (the frozen-weight change a rule folds in, in units of the adapter product B A)."""
  return jax.tree.map(lambda pair: {"W": jnp.zeros((pair["B"].shape[-2], pair["A"].shape[-1]),
                                                   pair["A"].dtype)},
                      lora_tree, is_leaf=is_factor_pair)


def fold_into(frozen: PyTree, folds: PyTree, scale: float) -> PyTree:
  """The frozen params with each layer's fold added to its kernel, W0 <- W0 + scale * W
  (`folds` as `zero_folds` gives, at the LoRA tree's paths; () or {}: `frozen` itself). The
  kernel is stored [*in_shape, *out_shape], so the [d_out, d_in] fold goes in transposed.

  References:
    docs/algorithm.md section 5 (FedEx-LoRA: the residual folded into the frozen weights).
  """
  if not isinstance(folds, Mapping) or not folds:
    return frozen
  if is_fold(folds):
    kernel = frozen["kernel"]
    return {**frozen, "kernel": kernel + scale * folds["W"].T.reshape(kernel.shape)}
  return {name: fold_into(sub, folds[name], scale) if name in folds else sub
          for name, sub in frozen.items()}


def path_str(path: tuple[Any, ...]) -> str:
  """'/'-joined key path, the checkpoint naming convention."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


def lora_layers(lora_tree: PyTree) -> list[tuple[str, Mapping[str, jax.Array]]]:
  """Adapted layers of a LoRA tree, in `jax.tree` order.

  Args:
    lora_tree: the `'lora'` collection.

  Returns:
    `(path, {"A": ..., "B": ...})` per layer, path like
    `"Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query"`.
  """
  leaves, _ = jax.tree.flatten_with_path(lora_tree, is_leaf=is_factor_pair)
  return [(path_str(path), pair) for path, pair in leaves]


def lora_layer_dims(lora_tree: PyTree) -> list[tuple[str, int, int]]:
  """Sizes of every adapted layer.

  Args:
    lora_tree: the `'lora'` collection (arrays or ShapeDtypeStructs).

  Returns:
    `(path, d_in, d_out)` per layer, in `jax.tree` order.
  """
  return [(path, pair["A"].shape[1], pair["B"].shape[0])
          for path, pair in lora_layers(lora_tree)]


def lora_num_values(lora_tree: PyTree) -> int:
  """Total number of floats in a LoRA tree (sum of r * (d_in + d_out) over layers).

  Args:
    lora_tree: the `'lora'` collection (arrays or ShapeDtypeStructs).

  Returns:
    The count.
  """
  # optax.tree.size would call jnp.size, which rejects ShapeDtypeStructs.
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(lora_tree))


def merge_lora(params: PyTree, lora_tree: PyTree, lora_cfg: LoRAConfig) -> PyTree:
  """Folds the adapters into the frozen kernels: `W = W0 + (alpha / r) (B A)^T`.

  The merged params applied by a model without adapters compute the same function as the
  adapted model (used to test the adapter, and to export a plain checkpoint).

  Args:
    params: the `'params'` collection.
    lora_tree: the `'lora'` collection of the same model.
    lora_cfg: adapter configuration (for the scale).

  Returns:
    A params tree of the same structure with adapted kernels replaced.

  Raises:
    ValueError: a LoRA layer has no matching `kernel` in `params`.

  References:
    ALGORITHM.md section 1 (`y = W0 x + (alpha / r) B (A x)`).
  """
  factors = dict(lora_layers(lora_tree))
  scale = lora_scale(lora_cfg)
  merged = set()

  def merge_leaf(path, kernel):
    name = path_str(path)
    layer, _, leaf_name = name.rpartition("/")
    if leaf_name != "kernel" or layer not in factors:
      return kernel
    merged.add(layer)
    pair = factors[layer]
    # Kernels are stored [*in_shape, *out_shape]; B A maps d_in -> d_out, so transpose it
    # to [d_in, d_out] before restoring the kernel's axes.
    delta = (pair["B"] @ pair["A"]).T.reshape(kernel.shape)
    return kernel + scale * delta

  out = jax.tree.map_with_path(merge_leaf, params)
  unmatched = sorted(set(factors) - merged)
  if unmatched:
    raise ValueError(f"LoRA layers without a kernel in params: {unmatched}.")
  return out


def split_head(params: PyTree) -> tuple[PyTree, PyTree]:
  """Separates the classifier head from the frozen backbone.

  Args:
    params: the `'params'` collection.

  Returns:
    `(frozen, head)`: params without `head`, and the `head` sub-tree.
  """
  if HEAD not in params:
    raise KeyError(f"params has no {HEAD!r} entry; top-level keys: {sorted(params)}.")
  frozen = {k: v for k, v in params.items() if k != HEAD}
  return frozen, params[HEAD]


def join_head(frozen: PyTree, head: PyTree) -> PyTree:
  """Inverse of `split_head`.

  Args:
    frozen: params without `head`.
    head: the head sub-tree.

  Returns:
    The full `'params'` collection.
  """
  return {**frozen, HEAD: head}
