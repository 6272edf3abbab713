"""The engine scheduler's settings: the one mapping from a pool's CRD fields, and the flags the
operator renders from them, which `tessera serve` reads back into the same settings."""

from __future__ import annotations

import pytest
from tessera.agents.serving.cli import serve_command
from tessera.api.model_deployment import PoolPlan, PoolRole
from tessera.api.scheduler import SchedulerConfig


def _pool(**fields: object) -> PoolPlan:
    return PoolPlan(
        name="colocated-h100",
        role=PoolRole.COLOCATED,
        accelerator_class="h100",
        tensor_parallel=1,
        replicas=1,
        **fields,
    )


def test_a_pool_maps_its_crd_fields_to_vllm_settings() -> None:
    chunked = _pool(prefillChunkTokens=512, maxRunningRequests=212)
    assert chunked.scheduler(8192) == SchedulerConfig(212, 512, True)
    assert chunked.scheduler(8192).prefill_chunk_tokens == 512
    whole = _pool(maxRunningRequests=212)
    assert whole.scheduler(8192) == SchedulerConfig(212, 8192, False)
    assert whole.scheduler(1024).max_num_batched_tokens == 2048  # vLLM's least budget
    assert whole.scheduler(8192).prefill_chunk_tokens is None
    # A plan written before the cap was recorded runs with the engine's default cap.
    assert _pool().scheduler(4096).max_num_seqs == SchedulerConfig().max_num_seqs


@pytest.mark.parametrize("field", ["max_num_seqs", "max_num_batched_tokens"])
def test_settings_below_one_are_refused_by_name(field: str) -> None:
    with pytest.raises(ValueError, match=f"{field} must be an integer >= 1, got 0"):
        SchedulerConfig(**{field: 0})  # type: ignore[arg-type]


def _served(*flags: str) -> SchedulerConfig:
    """The settings `tessera serve` builds its engine with, from its command line."""
    params = serve_command.make_context("serve", ["--model", "m", *flags]).params
    return SchedulerConfig(
        params["max_num_seqs"], params["max_num_batched_tokens"], params["enable_chunked_prefill"]
    )


@pytest.mark.parametrize(
    "config",
    [SchedulerConfig(), SchedulerConfig(64, 512, True), SchedulerConfig(256, 8192, False)],
    ids=["defaults", "chunked", "whole-prompt"],
)
def test_tessera_serve_reads_the_rendered_flags_back_into_the_same_settings(
    config: SchedulerConfig,
) -> None:
    assert _served(*config.engine_flags()) == config


def test_tessera_serve_defaults_are_the_settings_defaults() -> None:
    assert _served() == SchedulerConfig()
