"""CUDA graphs of the decode step, one per batch-size bucket.

A decode step of an 8B model is ~300 small launches; replaying them as one graph removes the
launch gaps that otherwise dominate at small batch. Inputs live in static buffers; a batch is
padded up to its bucket with rows that point at the reserved block 0, and the attention grid is
sized for `max_context_len`, so one graph serves every context up to it.
"""

from __future__ import annotations

import torch
from tessera.agents.engine.attention import AttentionMetadata
from tessera.agents.engine.block_tables import padded_block_table
from tessera.agents.engine.kv_cache import PagedKVCache
from tessera.agents.engine.model import LlamaModel

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)


class DecodeGraphRunner:
    """Captures `model.forward` + logits for decode batches and replays them."""

    def __init__(
        self,
        model: LlamaModel,
        kv_cache: PagedKVCache,
        max_context_len: int,
        batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
    ) -> None:
        if not kv_cache.device.type == "cuda":
            raise ValueError("CUDA graphs need the KV cache on a CUDA device")
        self.model = model
        self.kv_cache = kv_cache
        self.max_context_len = max_context_len
        self.batch_sizes = tuple(sorted(set(batch_sizes)))
        self.max_batch = self.batch_sizes[-1]
        self.width = kv_cache.blocks_for_tokens(max_context_len)
        device = kv_cache.device
        self.input_ids = torch.zeros(self.max_batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(self.max_batch, dtype=torch.long, device=device)
        self.slot_mapping = torch.zeros(self.max_batch, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(
            self.max_batch, self.width, dtype=torch.int32, device=device
        )
        self.context_lens = torch.ones(self.max_batch, dtype=torch.int32, device=device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle()

    def bucket(self, batch: int) -> int:
        for size in self.batch_sizes:
            if size >= batch:
                return size
        raise ValueError(f"batch {batch} exceeds the largest captured size {self.max_batch}")

    def _meta(self, batch: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:batch],
            num_decode_tokens=batch,
            decode_block_tables=self.block_tables[:batch],
            decode_context_lens=self.context_lens[:batch],
            decode_max_context_len=self.max_context_len,
        )

    def _run(self, batch: int) -> torch.Tensor:
        hidden = self.model.forward(
            self.input_ids[:batch], self.positions[:batch], self._meta(batch), self.kv_cache
        )
        return self.model.compute_logits(hidden)

    def capture(self, batch_sizes: tuple[int, ...] | None = None) -> None:
        """Capture the given buckets (default all), largest first so memory is reused."""
        sizes = sorted(batch_sizes or self.batch_sizes, reverse=True)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for batch in sizes:
                for _ in range(2):  # compile the Triton kernels and warm cuBLAS outside capture
                    self._run(batch)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool, stream=stream):
                    logits = self._run(batch)
                self._graphs[batch] = (graph, logits)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()

    def load(
        self,
        input_ids: list[int],
        positions: list[int],
        slot_mapping: list[int],
        block_tables: list[list[int]],
        context_lens: list[int],
    ) -> int:
        """Copy a batch into the static buffers, padded to its bucket; returns the bucket."""
        batch = len(input_ids)
        bucket = self.bucket(batch)
        pad = bucket - batch
        table = padded_block_table(block_tables, bucket, self.width)  # no per-row tensor ops
        self.input_ids[:bucket].copy_(torch.tensor(input_ids + [0] * pad))
        self.positions[:bucket].copy_(torch.tensor(positions + [0] * pad))
        self.slot_mapping[:bucket].copy_(torch.tensor(slot_mapping + [0] * pad))
        self.block_tables[:bucket].copy_(table)
        self.context_lens[:bucket].copy_(torch.tensor(context_lens + [1] * pad, dtype=torch.int32))
        return bucket

    def replay(self, bucket: int) -> torch.Tensor:
        """Run the captured step on whatever the buffers hold; logits [bucket, vocab]."""
        if bucket not in self._graphs:
            self.capture((bucket,))
        graph, logits = self._graphs[bucket]
        graph.replay()
        return logits

    def run(
        self,
        input_ids: list[int],
        positions: list[int],
        slot_mapping: list[int],
        block_tables: list[list[int]],
        context_lens: list[int],
    ) -> torch.Tensor:
        bucket = self.load(input_ids, positions, slot_mapping, block_tables, context_lens)
        return self.replay(bucket)[: len(input_ids)]
