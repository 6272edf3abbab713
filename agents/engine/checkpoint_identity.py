"""The identity of a checkpoint as KV packages name it: the same for every engine that loads it.

`kv_transfer.model_identity` digests the weights as an engine holds them: in its dtype and, on
a tensor-parallel rank, only that rank's slices. Two engines of one checkpoint at different
degrees or dtypes would then refuse each other's KV although it is the same model's, which is
exactly the pair that re-sharding on receipt (kv_reshard.py) serves. This digest is taken from
the checkpoint's files instead: the whole model's config, and every stored tensor's name, shape,
stored dtype and first and last rows as stored. A fine-tune, a merged adapter or another config
changes it; the degree and dtype an engine loads it at do not.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from tessera.agents.engine.config import LlamaConfig
from tessera.agents.engine.weights import _checkpoint_files

SAMPLE = 256
"""Values read from each end of a 1-D tensor (a matrix gives its first and last rows)."""


def checkpoint_identity(path: str | Path, config: LlamaConfig) -> str:
    """`config.signature` (the whole model's) and a digest of the config and of the ends of
    every tensor in the checkpoint folder `path`. Reads a few rows per tensor (safetensors
    slices the mapped file), never a whole matrix."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(json.dumps(asdict(config), sort_keys=True, default=str).encode())
    with ExitStack() as stack:
        handles = {}
        for file in _checkpoint_files(Path(path)):
            handle = stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
            for name in handle.keys():  # noqa: SIM118 (safe_open handles are not mappings)
                handles[name] = handle
        for name in sorted(handles):
            part = handles[name].get_slice(name)
            shape = tuple(part.get_shape())
            ends = _ends(part, shape)
            digest.update(f"{name}:{shape}:{ends.dtype};".encode())
            digest.update(ends.contiguous().view(torch.uint8).numpy().tobytes())
    return f"{config.signature}:{digest.hexdigest()}"


def _ends(part: object, shape: tuple[int, ...]) -> torch.Tensor:
    """The first and last rows of a matrix, the first and last SAMPLE values of a vector."""
    if not shape or 0 in shape:
        return torch.empty(0)
    rows = shape[0]
    if len(shape) == 1:
        first, last = part[:SAMPLE], part[max(0, rows - SAMPLE) :]  # type: ignore[index]
    else:
        first, last = part[0:1], part[rows - 1 : rows]  # type: ignore[index]
    return torch.cat([first.reshape(-1), last.reshape(-1)])
