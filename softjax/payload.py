"""Uplink payload accounting, shared by every method so their bit counts compare.

References: ALGORITHM.md section 2.5,
  bits = q * m * sum_l (d_in_l + d_out_l) + index_bits + q * head_params,
  index_bits per layer = min(r, m * ceil(log2 r))   (a bitmap or a list, whichever is smaller).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax.numpy as jnp


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
