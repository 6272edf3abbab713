"""Block tables as one int32 tensor [rows, width], from the engine's per-request lists.

Built once per decode step for every decoding request, so on the host's critical path: a
per-row `table[row, :n] = torch.tensor(blocks)` costs two tensor ops per request (about 10 us
each on a busy CPU box, bench/host_step_overhead.py's GPU-path share). Here the rows are
written into one flat `array` buffer and wrapped as a tensor without a copy (~1 us a row).
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

import torch


def padded_block_table(tables: Sequence[Sequence[int]], rows: int, width: int) -> torch.Tensor:
    """`tables` as an int32 CPU tensor [rows, width]: row i holds tables[i] then zeros; rows
    past len(tables) are zeros (a CUDA graph's padding). Raises ValueError when a table is
    wider than `width` or there are more tables than `rows`."""
    if len(tables) > rows:
        raise ValueError(f"{len(tables)} block tables for {rows} rows")
    flat = array("i", bytes(4 * rows * width))
    for row, blocks in enumerate(tables):
        if len(blocks) > width:
            raise ValueError(f"block table {row} has {len(blocks)} blocks; the width is {width}")
        start = row * width
        flat[start : start + len(blocks)] = array("i", blocks)
    if not flat:
        return torch.zeros(rows, width, dtype=torch.int32)
    return torch.frombuffer(flat, dtype=torch.int32).view(rows, width)
