"""The model shapes the benches build: the tiny Llama of their CPU smoke modes, and a
deployment's model as a Hugging Face config.

One definition, so that every smoke run exercises the same 2-layer, 64-wide model and a
deployment's architecture is spelled as a checkpoint config in one place only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tessera.agents.engine.config import LlamaConfig

TINY_SHAPE: dict[str, int] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
}
"""The layers of the smoke model; the vocabulary and context vary with what a bench needs."""


def tiny_model(vocab_size: int, max_position_embeddings: int, **extra: Any) -> dict[str, Any]:
    """The smoke model as a Hugging Face config dictionary (`extra` adds or overrides keys)."""
    return {
        "vocab_size": vocab_size,
        **TINY_SHAPE,
        "max_position_embeddings": max_position_embeddings,
        **extra,
    }


def tiny_llama_config(vocab_size: int, max_position_embeddings: int, **extra: Any) -> LlamaConfig:
    """The smoke model as the engine's config (`extra`: further LlamaConfig fields)."""
    from tessera.agents.engine.config import LlamaConfig  # deferred: benches import torch late

    return LlamaConfig(**tiny_model(vocab_size, max_position_embeddings, **extra))


def hf_model_of(arch: Any) -> dict[str, int]:
    """A deployment's `spec.model.architecture` as a Hugging Face Llama config dictionary."""
    return {
        "vocab_size": arch.vocab_size,
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.intermediate_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_key_value_heads,
        "head_dim": arch.resolved_head_dim,
        "max_position_embeddings": arch.max_context_tokens,
    }
