"""agents/engine/block_tables.py: the padded block table is what the per-row fill made."""

from __future__ import annotations

import random

import pytest
import torch
from tessera.agents.engine.block_tables import padded_block_table


def _row_by_row(tables: list[list[int]], rows: int, width: int) -> torch.Tensor:
    table = torch.zeros(rows, width, dtype=torch.int32)
    for row, blocks in enumerate(tables):
        table[row, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
    return table


@pytest.mark.parametrize("seed", range(5))
def test_the_table_is_the_row_by_row_fill(seed: int) -> None:
    rng = random.Random(seed)
    width = rng.randrange(1, 40)
    rows = rng.randrange(1, 20)
    tables = [
        [rng.randrange(2**31 - 1) for _ in range(rng.randrange(width + 1))]
        for _ in range(rng.randrange(rows + 1))
    ]
    got = padded_block_table(tables, rows, width)
    assert got.dtype == torch.int32 and got.shape == (rows, width)
    assert torch.equal(got, _row_by_row(tables, rows, width))


def test_a_table_wider_than_the_width_or_too_many_tables_is_refused() -> None:
    with pytest.raises(ValueError, match="block table 1 has 3 blocks; the width is 2"):
        padded_block_table([[1], [1, 2, 3]], 2, 2)
    with pytest.raises(ValueError, match="3 block tables for 2 rows"):
        padded_block_table([[1], [2], [3]], 2, 2)


def test_empty_shapes() -> None:
    assert padded_block_table([], 0, 4).shape == (0, 4)
    assert padded_block_table([[]], 1, 0).shape == (1, 0)
