"""HostBufferPool: a buffer comes back only once nothing (tensor, view, memoryview) uses it,
and the pool keeps no more than its byte limit."""

from __future__ import annotations

import torch
from tessera.agents.engine.host_buffers import MIN_POOLED_BYTES, HostBufferPool

SIZE = 2 * MIN_POOLED_BYTES


def test_a_buffer_in_use_through_a_view_is_not_handed_out_again() -> None:
    pool = HostBufferPool()
    first = pool.take(SIZE)
    view = torch.frombuffer(first, dtype=torch.uint8).view(torch.float32)[1:]
    del first
    second = pool.take(SIZE)
    view[0] = 1.5  # the first buffer is still written through the view
    assert pool.reused == 0
    assert second[4:8] == bytearray(4)


def test_a_buffer_nobody_uses_is_handed_out_again() -> None:
    pool = HostBufferPool()
    first = pool.take(SIZE)
    tensor = torch.frombuffer(first, dtype=torch.uint8)
    address = tensor.data_ptr()
    del first, tensor
    again = pool.take(SIZE)
    assert pool.reused == 1
    assert torch.frombuffer(again, dtype=torch.uint8).data_ptr() == address


def test_a_memoryview_keeps_its_buffer_out_of_the_pool() -> None:
    pool = HostBufferPool()
    first = pool.take(SIZE)
    view = memoryview(first)
    del first
    pool.take(SIZE)
    assert pool.reused == 0
    view.release()


def test_the_pool_keeps_no_more_than_its_limit() -> None:
    pool = HostBufferPool(max_bytes=3 * SIZE)
    held = [pool.take(SIZE) for _ in range(5)]  # all in use: two are handed out unpooled
    assert sum(len(buffer) for buffer in pool._buffers) <= 3 * SIZE
    del held
    pool.take(4 * MIN_POOLED_BYTES)  # another size: free buffers make room for it
    assert sum(len(buffer) for buffer in pool._buffers) <= 3 * SIZE


def test_small_buffers_are_not_pooled() -> None:
    pool = HostBufferPool()
    pool.take(MIN_POOLED_BYTES // 2)
    assert pool._buffers == []
