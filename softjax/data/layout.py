"""Client-major layout of the federated training set: rows grouped client by client, one block
per process, with each client's padded index table.

References: DESIGN.md (multi-host feeding: each process owns a contiguous block of clients).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np


def client_owner(num_clients: int, num_processes: int) -> np.ndarray:
  """The process that feeds client k: contiguous blocks, owner(k) = floor(k P / N). int32 [N]."""
  return (np.arange(num_clients, dtype=np.int64) * num_processes // num_clients).astype(np.int32)


class ClientMajorLayout(NamedTuple):
  """Where every client's examples sit in the device-resident training set."""
  rows: np.ndarray  # int64 [M_pad]: source example of each row; -1 = padding (never indexed)
  table: np.ndarray  # int32 [N, max_n]: client k's rows, padded with 0 (never reached)
  counts: np.ndarray  # int32 [N]
  owner: np.ndarray  # int32 [N]: the process that feeds the client
  block_rows: int  # rows per process block; process p holds rows [p * block, (p + 1) * block)


def client_major_layout(clients: Sequence[np.ndarray], num_processes: int = 1,
                        multiple: int = 1) -> ClientMajorLayout:
  """Lays the training set out client by client, one equal-size block per process.

  Client k's examples are rows offset_k .. offset_k + n_k - 1 of its owner's block, in the
  order of its index list, so the example at position j of its table row is clients[k][j] as
  before: the layout moves examples, never changes which one a client sees where.

  Args:
    clients: one array of source example indices per client (e.g. from `partition`).
    num_processes: P, the processes feeding the mesh.
    multiple: each block is padded to a multiple of this (devices per process), so the rows
      split evenly over every device.
  """
  n = len(clients)
  owner = client_owner(n, num_processes)
  counts = np.array([len(c) for c in clients], np.int32)
  per_process = [int(counts[owner == p].sum()) for p in range(num_processes)]
  block = max(1, -(-max(per_process) // multiple) * multiple)
  rows = np.full(num_processes * block, -1, np.int64)
  table = np.zeros((n, max(1, int(counts.max(initial=0)))), np.int32)
  fill = np.arange(num_processes) * block  # next free row of each block
  for k, ix in enumerate(clients):
    start = fill[owner[k]]
    rows[start:start + len(ix)] = ix
    table[k, :len(ix)] = np.arange(start, start + len(ix))
    fill[owner[k]] += len(ix)
  return ClientMajorLayout(rows=rows, table=table, counts=counts, owner=owner, block_rows=block)


def gather_rows(array: np.ndarray, rows: np.ndarray) -> np.ndarray:
  """array[rows] with zeros where rows is -1 (padding)."""
  out = array[np.maximum(rows, 0)]
  out[rows < 0] = 0
  return out
