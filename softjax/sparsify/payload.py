"""Uplink payload accounting, shared by every method so their bit counts compare.

References: ALGORITHM.md section 2.5,
  bits = q * m * sum_l (d_in_l + d_out_l) + index_bits + q * head_params,
  index_bits per layer = min(r, m * ceil(log2 r))   (a bitmap or a list, whichever is smaller).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax.numpy as jnp

from softjax.config.choices import METHODS
from softjax.models import lora as lora_lib
from softjax.sparsify import masks as masks_lib

PyTree = Any


def index_bits_per_layer(rank: int, kept):
  """Bits that name which `kept` of `rank` entries a layer sends (bitmap or index list).

  `kept` may be a Python int (host) or a traced int32 (inside the round, from the masks).
  Sending all `rank` entries needs no index.
  """
  per_index = math.ceil(math.log2(rank)) if rank > 1 else 0
  if isinstance(kept, int):
    return 0 if kept >= rank else min(rank, kept * per_index)
  return jnp.where(kept >= rank, 0, jnp.minimum(rank, kept * per_index)).astype(jnp.int32)


def lora_upload_bits(layer_dims: Sequence[tuple[int, int]], *, rank: int, kept: int,
                     value_bits: int, head_params: int) -> int:
  """Bits one client uploads in one round when it keeps `kept` of `rank` components per layer.

  Args:
    layer_dims: (d_in, d_out) of every adapted matrix.
    rank: LoRA rank r.
    kept: components sent per layer, m (m = r for a dense upload).
    value_bits: q, bits per value (32 for float32, 16 for bfloat16).
    head_params: trainable head values, always sent densely.

  Returns:
    The payload in bits (ALGORITHM.md 2.5).
  """
  values = kept * sum(d_in + d_out for d_in, d_out in layer_dims)
  index = len(layer_dims) * index_bits_per_layer(rank, kept)
  return value_bits * values + index + value_bits * head_params


def worst_case_index_bits(num_layers: int, rank: int) -> int:
  """Largest index cost of a sparse upload over every m, from the shared payload accounting.

  mbar needs the index bits before m is known; taking their maximum over m (at most a bitmap of r
  bits per layer) keeps the closed form conservative [choice].

  Args:
    num_layers: L, the adapted matrices.
    rank: r.

  Returns:
    Bits.

  References: ALGORITHM.md sections 2.5 and 5, step 2.
  """
  return num_layers * max(index_bits_per_layer(rank, m) for m in range(1, rank + 1))


def upload_bits_fn(layer_dims: Sequence[tuple[int, int]], rank: int, value_bits: int,
                   head_params: int) -> Callable[[int], int]:
  """m -> bits one client uploads when it keeps m components per layer (shared accounting).

  References: ALGORITHM.md sections 2.5 and 6.
  """
  dims = [tuple(d) for d in layer_dims]

  def bits(m: int) -> int:
    return lora_upload_bits(dims, rank=rank, kept=int(m), value_bits=value_bits,
                                    head_params=head_params)

  return bits


def dense_upload_bits(layer_dims, rank: int, value_bits: int, head_params: int) -> int:
  """Bits of a dense upload at `rank` (ALGORITHM.md 2.5 with m = r)."""
  return lora_upload_bits(layer_dims, rank=rank, kept=rank, value_bits=value_bits,
                                  head_params=head_params)


def predicted_upload_bits(name: str, lora_shapes: PyTree, keep_ratio: float, *,
                          value_bits: int, head_params: int) -> int:
  """Host-side bits one client uploads with method `name` at keep ratio O, before any training.

  The payload of every method depends only on the shapes and O (for SOFT with per-layer
  selection; global top-(m L) selection spreads the same number of components unevenly over
  layers, so its index bits are only approximated here). The TSFA controller prices each
  candidate O with it before the round; tests check it equals the bits the jitted round reports.

  Args:
    name: one of METHODS.
    lora_shapes: the LoRA tree (arrays or ShapeDtypeStructs).
    keep_ratio: O in (0, 1].
    value_bits: q.
    head_params: head values, always sent densely.

  Returns:
    Bits (ALGORITHM.md 2.5 for factor uploads; section 7 for the element-wise and SVD methods).
  """
  pairs, _ = lora_lib.factor_pairs(lora_shapes)
  values = index = 0
  for p in pairs:
    (d_out, rank), d_in = p["B"].shape, p["A"].shape[1]
    m = int(masks_lib.kept_count(keep_ratio, rank))
    if name == "dense":
      values += rank * (d_in + d_out)
    elif name == "soft":
      values += m * (d_in + d_out)
      index += index_bits_per_layer(rank, m)
    elif name == "slora":
      values += m * (d_in + d_out + 1)
    elif name in ("tlora", "rlora"):
      for size in (d_out * rank, rank * d_in):
        k = int(masks_lib.topk_count(keep_ratio, size))
        values += k
        index += index_bits_per_layer(size, k) if name == "tlora" else 0
    else:
      raise ValueError(f"unknown method {name!r}; allowed: {', '.join(METHODS)}")
  return value_bits * (values + head_params) + index
