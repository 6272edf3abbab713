"""KV blocks across a tensor-parallel engine's ranks: export gathers, import scatters.

Each rank's paged cache holds its 1/TP of the KV heads at the same block ids (rank 0's
allocator decides for all). Rank 0's engine sees a `ShardedKVCache`: its own cache for the
forward, but whose `read_blocks` gathers every rank's heads of the blocks and whose
`write_blocks` hands each rank its heads, so the engine's export, import and migration code
deals in packages with all of the model's heads, whatever the degree: a TP=2 prefill's package
enters a TP=1 or TP=4 decode engine after `kv_reshard.reshard`. The other ranks join these
collectives when rank 0's driving model tells them (`follow_read`, `follow_write`).

The collectives go over the device group (NCCL on GPUs, gloo on the CPU), as the logits'
gather does: a package's blocks cross the ranks once, in one gather or one scatter.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import torch
import torch.distributed as dist
from tessera.agents.engine.config import LlamaConfig
from tessera.agents.engine.kv_cache import PagedKVCache
from tessera.agents.engine.kv_reshard import HEADS_DIM, split_heads
from tessera.agents.engine.parallel import TensorParallelGroup

READ_KV, WRITE_KV = "read_kv", "write_kv"
"""What rank 0 tells the other ranks before a gather (read) or a scatter (write) of blocks."""


class Driver(Protocol):
    """Rank 0's driving model (tp_worker.py): tells the other ranks what to do next, and is
    marked broken when a collective fails (the ranks may be out of step: the engine ends)."""

    broken: bool

    def tell(self, kind: str, payload: Any) -> TensorParallelGroup: ...


class ShardedKVCache(PagedKVCache):
    """Rank 0's cache: its own heads for the forward, every rank's for reads and writes."""

    def __init__(
        self,
        config: LlamaConfig,
        num_blocks: int,
        block_size: int,
        device: torch.device | str,
        dtype: torch.dtype,
        driver: Driver,
        tensor_parallel_size: int,
    ) -> None:
        """`config`: the rank's shard (its KV heads are 1/TP of the model's)."""
        super().__init__(config, num_blocks, block_size, device, dtype)
        self.driver = driver
        self.tensor_parallel_size = tensor_parallel_size
        """Read by `Engine.kv_geometry`: its blocks hold this many times the shard's heads."""

    def _shape(self, count: int, heads: int) -> tuple[int, ...]:
        layers, two, _, size, _, head_dim = self.data.shape
        return (count, layers, two, size, heads, head_dim)

    def read_blocks(self, block_ids: Sequence[int]) -> torch.Tensor:
        """The blocks with all ranks' heads, in head order: [n, layers, 2, size, H, head_dim]."""
        ids = list(block_ids)
        local = super().read_blocks(ids)
        if not ids:
            heads = local.shape[HEADS_DIM] * self.tensor_parallel_size
            return local.new_empty(self._shape(0, heads))
        parts = [torch.empty_like(local) for _ in range(self.tensor_parallel_size)]
        with self._collective():
            group = self.driver.tell(READ_KV, ids)
            dist.gather(local, parts, dst=0, group=group.device_group)
        return torch.cat(parts, dim=HEADS_DIM)

    def write_blocks(self, block_ids: Sequence[int], blocks: torch.Tensor) -> None:
        """Each rank's heads of `blocks` (all heads) into its cache at `block_ids`. Checked here,
        before any rank is told: a refused write leaves every rank's cache as it was."""
        ids = list(block_ids)
        heads = self.data.shape[HEADS_DIM] * self.tensor_parallel_size
        expected = self._shape(len(ids), heads)
        if tuple(blocks.shape) != expected:
            raise ValueError(f"blocks have shape {tuple(blocks.shape)}, cache expects {expected}")
        if blocks.dtype != self.dtype:
            raise ValueError(f"blocks are {blocks.dtype}, the cache holds {self.dtype}")
        if not ids:
            return
        parts = [part.to(self.device) for part in split_heads(blocks, self.tensor_parallel_size)]
        mine = torch.empty_like(parts[0])
        with self._collective():
            group = self.driver.tell(WRITE_KV, ids)
            dist.scatter(mine, parts, src=0, group=group.device_group)
        super().write_blocks(ids, mine)

    @contextmanager
    def _collective(self) -> Iterator[None]:
        try:
            yield
        except Exception:
            self.driver.broken = True
            raise


def follow_read(kv_cache: PagedKVCache, group: TensorParallelGroup, block_ids: list[int]) -> None:
    """Ranks 1..TP-1: send this rank's heads of the blocks to rank 0's gather."""
    dist.gather(kv_cache.read_blocks(block_ids), None, dst=0, group=group.device_group)


def follow_write(kv_cache: PagedKVCache, group: TensorParallelGroup, block_ids: list[int]) -> None:
    """Ranks 1..TP-1: receive this rank's heads of the blocks from rank 0 and store them."""
    layers, two, _, size, heads, head_dim = kv_cache.data.shape
    mine = torch.empty(
        len(block_ids),
        layers,
        two,
        size,
        heads,
        head_dim,
        dtype=kv_cache.dtype,
        device=kv_cache.device,
    )
    dist.scatter(mine, None, src=0, group=group.device_group)
    kv_cache.write_blocks(block_ids, mine)
