"""Reusable host buffers for KV packages received over TCP (`kv_transfer.IncomingPackage`).

Why: a fresh buffer of hundreds of MiB is mapped lazily, so receiving into it takes a page
fault per 4 KiB page inside the kernel's copy; on the 2-core CI machine that alone made a
loopback receive 2.5-3x slower (0.55 GB/s into fresh memory, 1.5 GB/s into reused memory, in
bench/kv_package_bench.py's terms). GPU hosts receive into pinned memory instead, which torch's
caching host allocator already recycles; this pool is the same idea for pageable memory.

When is a buffer free again? Its package's blocks are a tensor over it (`torch.frombuffer`),
and every tensor, view or memoryview of it holds a reference to the bytearray through the
buffer protocol, whoever still uses it. So a pooled buffer whose only references are the pool's
own is referenced by nobody else and can be handed out again; the check is CPython's reference
count (as numpy's `ndarray.resize(refcheck=True)` does), calibrated once at import.
"""

from __future__ import annotations

import sys
import threading

DEFAULT_MAX_BYTES = 2 << 30
"""Most bytes the shared pool keeps (free or in use): two 1 GiB packages' worth. A buffer that
would go past it is handed out unpooled (and freed with its package)."""
MIN_POOLED_BYTES = 1 << 20
"""Smaller buffers are allocated fresh: their few page faults cost less than the bookkeeping."""


def _references(buffers: list[bytearray], index: int) -> int:
    return sys.getrefcount(buffers[index])


_BASELINE = _references([bytearray(1)], 0)
"""What `_references` counts for a buffer the pool's list alone holds."""


class HostBufferPool:
    """Bytearrays of exact sizes, handed out again once nobody references them."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._buffers: list[bytearray] = []
        self._lock = threading.Lock()
        self.reused = 0
        """Buffers handed out again (for tests and benches)."""

    def take(self, nbytes: int) -> bytearray:
        """A buffer of exactly `nbytes` that nobody else references; its contents are stale
        (the caller overwrites all of it)."""
        if nbytes < MIN_POOLED_BYTES:
            return bytearray(nbytes)
        with self._lock:
            buffers = self._buffers
            for index in range(len(buffers)):
                if len(buffers[index]) == nbytes and _references(buffers, index) == _BASELINE:
                    self.reused += 1
                    return buffers[index]
            held = sum(len(buffer) for buffer in buffers)
            index = 0
            while held + nbytes > self.max_bytes and index < len(buffers):
                if _references(buffers, index) == _BASELINE:  # free: make room
                    held -= len(buffers.pop(index))
                else:
                    index += 1
            buffer = bytearray(nbytes)
            if held + nbytes <= self.max_bytes:
                buffers.append(buffer)
            return buffer


shared_pool = HostBufferPool()
"""The process's pool: every TCP receiver without pinned memory draws from it."""
