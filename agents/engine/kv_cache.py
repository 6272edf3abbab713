"""The paged KV cache: fixed-size blocks of K and V, handed out from a free list.

A request holds a list of block ids (its block table); token `t` of the request lives in slot
`t % block_size` of block `table[t // block_size]`. Blocks are never shared (no copy-on-write).
Block 0 is reserved: padded rows of a captured CUDA graph point at it, so it is never handed out.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence

import torch
from tessera.agents.engine.config import LlamaConfig

RESERVED_BLOCKS = 1
"""Block 0 is the scratch block that padded decode rows read and write."""


class OutOfKVBlocksError(RuntimeError):
    """Fewer free blocks than asked for; the scheduler preempts or waits."""


class BlockOwnershipError(RuntimeError):
    """A block was freed that is not allocated (double free or a foreign id)."""


class BlockAllocator:
    """Free-list allocator of KV block ids.

    First in, first out: a freed block goes to the back, so recently freed blocks (whose data a
    late reader might still want) are the last to be reused.
    """

    def __init__(self, num_blocks: int, reserved: int = RESERVED_BLOCKS) -> None:
        if num_blocks <= reserved:
            raise ValueError(f"num_blocks ({num_blocks}) must exceed the {reserved} reserved")
        self.num_blocks = num_blocks
        self.reserved = reserved
        self._free: deque[int] = deque(range(reserved, num_blocks))
        self._allocated: set[int] = set()

    @property
    def capacity(self) -> int:
        """Blocks that can be handed out at all."""
        return self.num_blocks - self.reserved

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._allocated)

    def can_allocate(self, count: int) -> bool:
        return count <= len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count < 0:
            raise ValueError(f"cannot allocate {count} blocks")
        if count > len(self._free):
            raise OutOfKVBlocksError(f"asked for {count} KV blocks, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(count)]
        self._allocated.update(blocks)
        return blocks

    def free(self, blocks: Iterable[int]) -> None:
        blocks = list(blocks)
        if len(set(blocks)) != len(blocks):
            raise BlockOwnershipError(f"block ids repeated in one free: {sorted(blocks)}")
        unknown = [b for b in blocks if b not in self._allocated]
        if unknown:
            raise BlockOwnershipError(f"freeing blocks that are not allocated: {unknown}")
        self._allocated.difference_update(blocks)
        self._free.extend(blocks)


def blocks_for_tokens(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class PagedKVCache:
    """K and V for every layer in one tensor [layers, 2, blocks, block_size, kv_heads, head_dim].

    One allocation keeps a block's data for all layers reachable by a single gather, which is
    what export for P->D transfer and migration needs.
    """

    def __init__(
        self,
        config: LlamaConfig,
        num_blocks: int,
        block_size: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.config = config
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.dtype = dtype
        self.device = torch.device(device)
        self.data = torch.zeros(
            config.num_hidden_layers,
            2,
            num_blocks,
            block_size,
            config.num_key_value_heads,
            config.head_dim,
            device=self.device,
            dtype=dtype,
        )
        self.allocator = BlockAllocator(num_blocks)

    @staticmethod
    def num_blocks_for_bytes(
        config: LlamaConfig, budget_bytes: int, block_size: int, dtype: torch.dtype
    ) -> int:
        dtype_bytes = torch.tensor([], dtype=dtype).element_size()
        block_bytes = config.kv_bytes_per_token(dtype_bytes) * block_size
        return int(budget_bytes // block_bytes)

    def key_cache(self, layer: int) -> torch.Tensor:
        """[blocks, block_size, kv_heads, head_dim] view of one layer's keys."""
        return self.data[layer, 0]

    def value_cache(self, layer: int) -> torch.Tensor:
        return self.data[layer, 1]

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return blocks_for_tokens(num_tokens, self.block_size)

    def read_blocks(self, block_ids: Sequence[int]) -> torch.Tensor:
        """Copy of the blocks, block-major: [n, layers, 2, block_size, kv_heads, head_dim].

        Block-major so that each block's bytes are contiguous and can be checksummed and sent
        on their own.
        """
        index = torch.tensor(list(block_ids), dtype=torch.long, device=self.device)
        return self.data.index_select(2, index).permute(2, 0, 1, 3, 4, 5).contiguous()

    def write_blocks(self, block_ids: Sequence[int], blocks: torch.Tensor) -> None:
        """Inverse of `read_blocks`."""
        expected = (len(block_ids), *self.data.shape[:2], *self.data.shape[3:])
        if tuple(blocks.shape) != expected:
            raise ValueError(f"blocks have shape {tuple(blocks.shape)}, cache expects {expected}")
        if blocks.dtype != self.dtype:  # a cast would hide KV made by another engine's dtype
            raise ValueError(f"blocks are {blocks.dtype}, the cache holds {self.dtype}")
        index = torch.tensor(list(block_ids), dtype=torch.long, device=self.device)
        source = blocks.to(device=self.device).permute(1, 2, 0, 3, 4, 5)
        self.data.index_copy_(2, index, source)
