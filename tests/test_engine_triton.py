"""The Triton kernels against their references: on CUDA (gpu), and on the CPU through
Triton's interpreter where Triton is installed (CI's CPU torch has none: that test skips)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_helpers import random_prompts, reference_logits, write_checkpoint

HERE = Path(__file__).resolve().parent
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_kernels_under_triton_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, str(HERE / "engine_kernel_checks.py")],
        cwd=HERE,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "kernel checks: passed" in done.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and Triton")
def test_kernels_on_cuda() -> None:
    from engine_kernel_checks import run_all

    assert run_all("cuda", (torch.float32, torch.bfloat16)) == []


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and Triton")
def test_cuda_engine_with_graphs_matches_transformers(tmp_path: Path) -> None:
    from tessera.agents.engine import Engine, EngineConfig, SamplingParams, SchedulerConfig

    model = write_checkpoint(tmp_path, seed=31)
    engine = Engine.from_pretrained(
        tmp_path,
        EngineConfig(
            device="cuda",
            dtype=torch.float32,
            block_size=4,
            num_kv_blocks=128,
            scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64),
            cuda_graph_batch_sizes=(1, 2, 4, 8),
        ),
    )
    assert engine.graphs is not None
    prompts = random_prompts([3, 9, 14, 6, 21], 128, seed=6)
    params = SamplingParams(max_new_tokens=17, ignore_eos=True, return_logits=True)
    done = engine.generate(prompts, params)
    assert engine.kv_cache.allocator.num_used == 0
    for prompt, completion in zip(prompts, done, strict=True):
        ours = torch.stack(completion.logits)
        ref = reference_logits(model, prompt + completion.output_token_ids[:-1])
        ref = ref[len(prompt) - 1 :]
        assert (ours - ref).abs().max().item() < 1e-3 * ref.abs().max().item()
        assert completion.output_token_ids == ref.argmax(-1).tolist()
