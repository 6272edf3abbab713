"""Warm-up before /ready: the kernel variants it launches are every one serving can reach, and
`tessera serve` says ready only once the engine's warm-up has finished.

On the CPU the warm-up compiles nothing (no Triton, no CUDA graphs); what is checked here is
the enumeration of variants against the launch rule itself, and the ordering of warm-up and
/ready in the real server code, with a real engine whose warm-up the test holds.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from pathlib import Path

import pytest
import torch
from engine_helpers import random_prompts, write_checkpoint
from fastapi.testclient import TestClient
from tessera.agents.engine import Engine, EngineConfig, LlamaConfig, SchedulerConfig
from tessera.agents.engine.kernel_variants import decode_variant, decode_variants
from tessera.agents.engine.warmup import WarmUpReport
from tessera.agents.engine.weights import load_llama_weights
from tessera.agents.serving.app import Served, build_app
from tessera.agents.serving.metrics import ServingMetrics
from tessera.agents.serving.server import ServeConfig, start_serving
from tessera.agents.serving.tokenizer import ServingTokenizer


@pytest.mark.parametrize(
    ("max_batch", "num_kv_heads", "max_context_len", "num_sms", "tile"),
    [(8, 8, 3000, 132, 64), (16, 2, 5000, 8, 64), (5, 1, 700, 4, 16), (40, 8, 2048, 132, 32)],
)
def test_the_enumerated_decode_variants_are_exactly_those_any_launch_makes(
    max_batch: int, num_kv_heads: int, max_context_len: int, num_sms: int, tile: int
) -> None:
    reached = {
        decode_variant(batch, num_kv_heads, context, num_sms, tile)
        for batch in range(1, max_batch + 1)
        for context in range(1, max_context_len + 1)
    }
    variants = decode_variants(max_batch, num_kv_heads, max_context_len, num_sms, tile)
    assert set(variants) == reached
    for variant, (batch, context) in variants.items():
        assert 1 <= batch <= max_batch and 1 <= context <= max_context_len
        assert decode_variant(batch, num_kv_heads, context, num_sms, tile) == variant
    assert any(v.num_parts_pad == 0 for v in variants) and any(v.num_parts_pad for v in variants)


class HeldWarmUpEngine(Engine):
    """A real engine whose warm-up waits until the test lets it finish."""

    entered: threading.Event
    release: threading.Event

    def warm_up(self) -> WarmUpReport:
        self.entered.set()
        assert self.release.wait(30), "the test never released the warm-up"
        return super().warm_up()


def serve_config(model: Path) -> ServeConfig:
    return ServeConfig(
        weights=model,
        model_name="tiny",
        instance_id="warmup-test",
        host="127.0.0.1",
        port=0,
        max_model_len=256,
        pool="p",
        role="colocated",
        dtype="fp32",
        device="cpu",
        scheduler=SchedulerConfig(max_num_seqs=4),
        block_size=16,
        num_kv_blocks=64,
        kv_cache_memory_fraction=0.5,
        max_waiting_requests=4,
        request_timeout_s=None,
        seed=0,
        log_level="info",
    )


def test_ready_is_503_until_the_engines_warm_up_has_finished(tiny_model: Path) -> None:
    config = serve_config(tiny_model)
    llama = LlamaConfig.from_pretrained(tiny_model)
    weights = load_llama_weights(tiny_model, llama, device="cpu", dtype=torch.float32)
    engine_config = EngineConfig(
        device="cpu", dtype=torch.float32, num_kv_blocks=64, max_model_len=256
    )
    engine = HeldWarmUpEngine(llama, weights, engine_config)
    engine.entered, engine.release = threading.Event(), threading.Event()
    served = Served(model_name="tiny", max_model_len=256, metrics=ServingMetrics("tiny", "p", "c"))
    tokenizer = ServingTokenizer.from_folder(tiny_model)
    loader = threading.Thread(target=start_serving, args=(engine, tokenizer, config, served))
    with TestClient(build_app(served)) as client:
        assert client.get("/ready").status_code == 503
        loader.start()
        assert engine.entered.wait(30)
        for _ in range(3):  # held in warm-up: alive, not ready, and no request is taken
            assert client.get("/health").status_code == 200
            assert client.get("/ready").status_code == 503
            refused = client.post("/v1/completions", json={"prompt": [1, 5], "max_tokens": 2})
            assert refused.status_code == 503
        engine.release.set()
        deadline = time.monotonic() + 30
        while (ready := client.get("/ready")).status_code != 200:
            assert time.monotonic() < deadline, "not ready 30 s after the warm-up was released"
            time.sleep(0.05)  # polling /ready with the deadline above
        loader.join(30)
        warmup = ready.json()["warmup"]
        # CPU: no graphs and no Triton kernels to compile, but the warm-up did run.
        assert warmup["graph_batch_sizes"] == [] and warmup["decode_kernel_variants"] == 0
        assert warmup["seconds"] >= 0
        done = client.post("/v1/completions", json={"prompt": [1, 5], "max_tokens": 2})
        assert done.status_code == 200, done.text
    assert served.loop is not None
    served.loop.stop()


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
    reason="needs CUDA and Triton",
)
def test_on_cuda_nothing_compiles_while_serving_after_the_warm_up(tmp_path: Path) -> None:
    """Mixed steps (chunks beside decodes), every batch size and context up to the model's:
    the attention kernels' JIT caches hold after the warm-up all they hold after serving."""
    from tessera.agents.engine import SamplingParams, triton_kernels

    write_checkpoint(tmp_path, seed=5, max_position_embeddings=512)
    engine = Engine.from_pretrained(
        tmp_path,
        EngineConfig(
            device="cuda",
            dtype=torch.bfloat16,
            num_kv_blocks=256,
            scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64),
            cuda_graph_batch_sizes=(1, 2, 4, 8),
        ),
    )
    report = engine.warm_up()
    assert report.graph_batch_sizes == (1, 2, 4, 8) and report.prefill_kernel_variants == 1
    warm = triton_kernels.compiled_variants()
    assert warm["paged_prefill"] == 1 and warm["paged_decode"] > 0
    lengths = [3, 17, 40, 90, 200, 5, 333, 64, 1, 129, 250, 12]
    prompts = random_prompts(lengths, vocab=100, seed=4)
    engine.generate(prompts, SamplingParams(max_new_tokens=150, ignore_eos=True))
    assert triton_kernels.compiled_variants() == warm
