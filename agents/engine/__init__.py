"""tessera.agents.engine: the node agent's inference engine (Llama architecture, torch).

Paged KV cache, continuous batching with chunked prefill, Triton kernels and CUDA graphs on
CUDA (torch fallbacks on the CPU), and block-level KV export/import for prefill->decode transfer
and live migration. `Engine` is the entry point; `Engine.stats_snapshot()` is what the agent's
telemetry reads.
"""

from tessera.agents.engine.config import LlamaConfig, UnsupportedModelError
from tessera.agents.engine.engine import (
    Engine,
    EngineConfig,
    EngineRole,
    NoProgressError,
    RequestNotFoundError,
    RoleError,
)
from tessera.agents.engine.kv_cache import OutOfKVBlocksError
from tessera.agents.engine.kv_transfer import KVChecksumError, KVPackage, KVTransferError
from tessera.agents.engine.request import (
    Completion,
    FinishReason,
    InvalidSamplingParamsError,
    RequestOutput,
    SamplingParams,
)
from tessera.agents.engine.scheduler import SchedulerConfig
from tessera.agents.engine.stats import EngineStatsSnapshot

__all__ = [
    "Completion",
    "Engine",
    "EngineConfig",
    "EngineRole",
    "EngineStatsSnapshot",
    "FinishReason",
    "InvalidSamplingParamsError",
    "KVChecksumError",
    "KVPackage",
    "KVTransferError",
    "LlamaConfig",
    "NoProgressError",
    "OutOfKVBlocksError",
    "RequestNotFoundError",
    "RequestOutput",
    "RoleError",
    "SamplingParams",
    "SchedulerConfig",
    "UnsupportedModelError",
]
