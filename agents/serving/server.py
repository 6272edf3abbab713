"""Run `tessera serve`: HTTP first, then the engine, so that /health answers while weights load.

uvicorn starts at once (a pod is alive while it loads); a loader thread reads the weights and
tokenizer, warms the engine up (`Engine.warm_up`: every decode CUDA graph captured and every
attention kernel variant compiled, then a short generation) and starts the serving loop; only
then does /ready answer 200. A load that fails stops the server with exit status 1.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
import uvicorn
from tessera.agents.engine import Engine, EngineConfig, SamplingParams, SchedulerConfig
from tessera.agents.engine.serving_loop import ServingLoop
from tessera.agents.engine.tp_engine import TensorParallelEngine, start_tensor_parallel_engine
from tessera.agents.serving.app import Served, build_app
from tessera.agents.serving.metrics import ServingMetrics
from tessera.agents.serving.tokenizer import ServingTokenizer

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GIL_SWITCH_INTERVAL_S = 0.0005
"""The serving loop's thread shares the process (and the GIL) with uvicorn's event loop. At
Python's default 5 ms, each time the engine thread comes back from a GPU wait while the event
loop is busy streaming tokens it may wait up to 5 ms for the GIL: a third of a 15 ms decode
step at batch 64. A tenth of that bounds the wait at 0.5 ms, for a few more thread switches."""


@dataclass(frozen=True)
class ServeConfig:
    """Everything `tessera serve` was told, checked (see cli.py)."""

    weights: Path
    model_name: str
    instance_id: str
    host: str
    port: int
    max_model_len: int
    pool: str
    role: str
    dtype: str | None
    device: str | None
    scheduler: SchedulerConfig
    block_size: int
    num_kv_blocks: int | None
    kv_cache_memory_fraction: float
    max_waiting_requests: int
    request_timeout_s: float | None
    seed: int
    log_level: str
    tensor_parallel_size: int = 1
    kv_port: int = 0
    """Prefill role: where decode instances open KV channels."""
    prefill_service: str | None = None
    """Decode role: the prefill instance (host:port of its HTTP) when a request names none."""
    attention_service: str | None = None
    """Attention offload: host:port of the attention worker holding this replica's KV."""
    fault_corrupt_kv_every: int = 0
    """Prefill role, test hook only: corrupt every Nth KV package sent (0: never)."""
    migration_port: int = 0
    """Colocated and decode roles: where live migrations come in (0: any free port, published
    on GET /internal/migration)."""
    migration_test_faults: bool = False
    """Test hook only: POST /internal/migrate takes a `test_fault`."""
    migration_attach_timeout_s: float = 15.0
    """A request migrated here that no client attaches to in this time is aborted."""


def load(
    config: ServeConfig, served: Served, on_engine_death: Callable[[str], None] | None = None
) -> None:
    """Load, warm up, start the loop; then the routes serve. With tensor parallelism the
    engine is one process per rank (tp_engine.py), and `on_engine_death` is told if one dies."""
    engine = build_engine(config, on_engine_death)
    start_serving(engine, ServingTokenizer.from_folder(config.weights), config, served)


def build_engine(
    config: ServeConfig, on_engine_death: Callable[[str], None] | None = None
) -> Engine:
    """The engine the flags describe, its weights loaded (not yet warmed up)."""
    from tessera.agents.serving.disaggregated import engine_role

    engine_config = EngineConfig(
        role=engine_role(config.role),
        device=config.device,
        dtype=DTYPES.get(config.dtype or ""),
        block_size=config.block_size,
        num_kv_blocks=config.num_kv_blocks,
        kv_cache_memory_fraction=config.kv_cache_memory_fraction,
        max_model_len=config.max_model_len,
        scheduler=config.scheduler,
        seed=config.seed,
    )
    if config.tensor_parallel_size > 1:
        # Engine's interface, run on rank 0 of the rank processes.
        return cast(
            Engine,
            start_tensor_parallel_engine(
                config.weights,
                engine_config,
                config.tensor_parallel_size,
                on_death=on_engine_death,
            ),
        )
    if config.attention_service:
        from tessera.agents.engine.attention_offload import offloaded_engine_from_service

        return offloaded_engine_from_service(
            config.weights, config.attention_service, engine_config
        )
    return Engine.from_pretrained(config.weights, engine_config)


def start_serving(
    engine: Engine, tokenizer: ServingTokenizer, config: ServeConfig, served: Served
) -> ServingLoop:
    """Warm the engine up (every decode graph captured, every attention kernel variant
    compiled: Engine.warm_up), run one short generation through it, and start its loop; only
    then do the routes serve and /ready answer 200."""
    import sys

    from tessera.agents.serving.disaggregated import PrefillLoop

    sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_INTERVAL_S))
    report = engine.warm_up()
    log.info(
        "warm-up: %d graphs, %d decode and %d prefill kernel variants in %.1f s",
        len(report.graph_batch_sizes),
        report.decode_kernel_variants,
        report.prefill_kernel_variants,
        report.seconds,
    )
    warm_prompt = tokenizer.encode("warm up") or [0]
    warm_tokens = 1 if config.role == "prefill" else 2  # a prefill engine parks at its 2nd
    engine.generate([warm_prompt], SamplingParams(max_new_tokens=warm_tokens, ignore_eos=True))
    served.metrics.start_from(engine.stats_snapshot(drain=True))
    loop = (PrefillLoop if config.role == "prefill" else ServingLoop)(
        engine,
        max_waiting=config.max_waiting_requests,
        on_iteration=served.metrics.observe_engine,
    )
    loop.start()
    served.warmup = report
    served.tokenizer = tokenizer
    served.loop = loop
    log.info("serving %s from %s on %s", config.model_name, config.weights, engine.device)
    return loop


def run(config: ServeConfig) -> int:
    """Serve until interrupted; returns the process exit status."""
    metrics = ServingMetrics(config.model_name, config.pool, config.role)
    metrics.touch()
    served = Served(
        model_name=config.model_name,
        max_model_len=config.max_model_len,
        metrics=metrics,
        instance_id=config.instance_id,
        request_timeout_s=config.request_timeout_s,
    )
    app = build_app(served)
    if config.role in ("prefill", "decode"):
        from tessera.agents.serving.disaggregated import attach

        timeout = config.request_timeout_s or 600.0
        attach(
            app,
            served,
            config.role,
            config.host,
            config.kv_port,
            config.prefill_service,
            config.fault_corrupt_kv_every,
            timeout,
            device=config.device,
        )
    if (
        config.role in ("colocated", "decode")
        and config.tensor_parallel_size == 1
        and config.attention_service is None
    ):
        from tessera.agents.serving.migration import attach_migration

        attach_migration(
            app,
            served,
            config.host,
            config.migration_port,
            config.migration_test_faults,
            config.request_timeout_s or 600.0,
            config.migration_attach_timeout_s,
        )
    server = uvicorn.Server(
        uvicorn.Config(
            app, host=config.host, port=config.port, log_level=config.log_level, access_log=False
        )
    )

    def engine_died(reason: str) -> None:  # a pod restarts a server whose ranks are gone
        served.load_error = f"engine failed: {reason}"
        server.should_exit = True

    def loader() -> None:
        try:
            load(config, served, engine_died)
        except Exception as error:
            log.exception("loading %s failed", config.weights)
            served.load_error = f"loading {config.weights} failed: {error}"
            server.should_exit = True

    threading.Thread(target=loader, name="weights-loader", daemon=True).start()
    server.run()
    if served.loop is not None:
        served.loop.stop()
        if isinstance(served.loop.engine, TensorParallelEngine):
            served.loop.engine.close()
    return 1 if served.load_error else 0
