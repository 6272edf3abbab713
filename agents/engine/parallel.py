"""Tensor parallelism (Megatron-style) for the Llama forward: the process group and the shards.

Each of TP ranks holds:
- column-parallel Q/K/V and gate/up: the output rows of 1/TP of the heads and of the MLP width
  (whole heads, so each rank attends over its own heads and holds only their slice of the paged
  KV cache: `LlamaConfig.tensor_parallel_shard` is that rank's shape);
- row-parallel o_proj and down_proj: the matching input columns; their partial outputs are
  summed with one all-reduce each, two per layer;
- the embedding replicated: a step reads only its tokens' rows of it, and splitting it would
  add a third all-reduce per step to save memory alone;
- the LM head vocab-parallel: the one matrix every decode step reads whole (0.5 GB of an 8B
  model's 16), so a replicated head would cost every rank its full read; each rank computes its
  vocabulary slice's logits and rank 0, the only rank that samples, gathers them.

Two groups: collectives on tensors go over the device group (NCCL on CUDA, gloo on the CPU);
step descriptions and other Python objects go over a gloo group on the host, so that they never
stage through device memory (vLLM's cpu_group / device_group split).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

DEFAULT_TIMEOUT_S = 600.0
"""How long a collective waits for a rank: a hung (not dead) rank fails the others after it.
A dead rank is found at once by the supervisor (tp_engine.py), which ends the others."""


@dataclass(frozen=True)
class TensorParallelShard:
    """Which slice of each sharded dimension rank `rank` of `size` holds."""

    rank: int
    size: int

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} is outside [0, {self.size})")

    def even(self, total: int) -> slice:
        """This rank's part of a dimension that the degree divides (heads, MLP width)."""
        if total % self.size:
            raise ValueError(f"{total} does not split into {self.size} equal shards")
        part = total // self.size
        return slice(self.rank * part, (self.rank + 1) * part)

    def vocab(self, vocab_size: int) -> slice:
        """This rank's rows of the LM head: ceil(V / TP) each, the last rank's maybe fewer (a
        vocabulary need not divide by the degree)."""
        part = self.vocab_part(vocab_size)
        start = min(self.rank * part, vocab_size)
        return slice(start, min(start + part, vocab_size))

    def vocab_part(self, vocab_size: int) -> int:
        return -(-vocab_size // self.size)


class TensorParallelGroup:
    """One rank's view of its tensor-parallel group (rank 0 drives, the others follow)."""

    def __init__(self, shard: TensorParallelShard, device: torch.device) -> None:
        self.shard = shard
        self.device = device
        self.device_group: Any = dist.group.WORLD
        self.cpu_group: Any = (
            dist.new_group(backend="gloo") if device.type != "cpu" else dist.group.WORLD
        )

    @property
    def rank(self) -> int:
        return self.shard.rank

    @property
    def size(self) -> int:
        return self.shard.size

    @property
    def is_driver(self) -> bool:
        return self.shard.rank == 0

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the ranks, in place; returns it."""
        dist.all_reduce(tensor, group=self.device_group)
        return tensor

    def gather_vocab(self, local_logits: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
        """Rank 0: the full [M, vocab] logits from every rank's [M, its slice]; others: None."""
        part = self.shard.vocab_part(vocab_size)
        _rows, width = local_logits.shape
        if width < part:  # the last rank's slice is short when TP does not divide the vocab
            local_logits = F.pad(local_logits, (0, part - width))
        local_logits = local_logits.contiguous()
        if not self.is_driver:
            dist.gather(local_logits, None, dst=0, group=self.device_group)
            return None
        parts = [torch.empty_like(local_logits) for _ in range(self.size)]
        dist.gather(local_logits, parts, dst=0, group=self.device_group)
        return torch.cat(parts, dim=1)[:, :vocab_size]

    def broadcast_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's `tensor` on every rank (the others pass a buffer of the same shape)."""
        dist.broadcast(tensor, src=0, group=self.device_group)
        return tensor

    def broadcast_object(self, obj: Any = None) -> Any:
        """Rank 0's picklable `obj` on every rank, over the host group."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.cpu_group)
        return box[0]

    def min_int(self, value: int) -> int:
        """The smallest of the ranks' values (e.g. the KV blocks that fit on every device)."""
        tensor = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return int(tensor.item())


def row_parallel_linear(
    x: torch.Tensor, weight: torch.Tensor, group: TensorParallelGroup | None
) -> torch.Tensor:
    """`x @ weight.T` for a weight split along its input columns: each rank's partial product,
    summed over the ranks. (Column-parallel layers need no function: a rank's slice of the
    output rows is an ordinary linear, and the next layer consumes it sharded.)"""
    out = F.linear(x, weight)
    return out if group is None else group.all_reduce(out)


def init_tensor_parallel(
    shard: TensorParallelShard,
    init_method: str,
    device: torch.device,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> TensorParallelGroup:
    """Join the group: NCCL on CUDA devices, gloo on the CPU. Call once per process."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # Ranks of one replica share a host: gloo's TCP pairs go over loopback unless told
    # otherwise, instead of whatever interface the host name resolves to.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=shard.rank,
        world_size=shard.size,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )
    return TensorParallelGroup(shard, device)


def destroy_tensor_parallel() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
