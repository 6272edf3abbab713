"""Shared pieces of the engine tests: a tiny random Llama checkpoint and its HF reference."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from tessera.agents.engine.tp_engine import TensorParallelEngine

TINY: dict[str, Any] = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def write_checkpoint(folder: Path, seed: int = 0, **overrides: Any) -> Any:
    """Save a random LlamaForCausalLM (safetensors) to `folder`; returns the HF model.

    Weights are drawn wider than HF's init and norms away from one, so that attention, RoPE
    and the norms all shape the logits (a near-uniform model would hide mistakes).
    """
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    config = HFConfig(**{**TINY, **overrides}, attn_implementation="eager")
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim == 1:
                parameter.normal_(1.0, 0.2)
            else:
                parameter.normal_(0.0, 0.15 if "embed" not in name else 1.0)
    model.eval()
    model.save_pretrained(folder, safe_serialization=True)
    return model


def reference_logits(model: Any, tokens: list[int]) -> torch.Tensor:
    """HF logits [len(tokens), vocab] of one sequence, teacher-forced, float32."""
    with torch.no_grad():
        out = model(torch.tensor([tokens]), use_cache=False)
    return out.logits[0].float()


def random_prompts(lengths: list[int], vocab: int, seed: int = 1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in lengths]


def rebuilt_package(package: Any, **changes: Any) -> Any:
    """`package` (a KVPackage) with fields changed and its checksums recomputed: consistent
    with itself, but maybe wrong for the engine that imports it."""
    from tessera.agents.engine.kv_transfer import KVPackage

    fields = {
        "request_id": package.request_id,
        "geometry": package.geometry,
        "prompt_token_ids": package.prompt_token_ids,
        "output_token_ids": package.output_token_ids,
        "num_computed_tokens": package.num_computed_tokens,
        "sampling": package.sampling,
        "blocks": package.blocks,
    }
    return KVPackage.build(**{**fields, **changes})


def process_running(pid: int) -> bool:
    """The process exists and is not a zombie (an orphan may wait for a slow reaper)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def wait_until(condition: Callable[[], bool], deadline_s: float = 30.0) -> bool:
    """Poll `condition` until it holds or the deadline passes; its last value."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@contextlib.contextmanager
def running_tensor_parallel(
    folder: Path, config: Any, degree: int
) -> Iterator[TensorParallelEngine]:
    """A tensor-parallel engine over `folder`'s checkpoint, closed on exit: its ranks are
    processes, and a test that left them running would hold CPU and ports past its end."""
    from tessera.agents.engine.tp_engine import start_tensor_parallel_engine

    engine = start_tensor_parallel_engine(folder, config, degree)
    try:
        yield engine
    finally:
        engine.close()
