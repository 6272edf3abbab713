"""The Llama decoder's forward pass over a flattened batch with a paged KV cache.

No torch.nn.Module: the weights are plain tensors and the forward is a function of (tokens,
positions, attention metadata, cache), which is what a CUDA graph captures and what the
scheduler's mixed batches (decode tokens and prefill chunks together) need.

Under tensor parallelism the same forward runs on every rank with that rank's shard (its
config is `LlamaConfig.tensor_parallel_shard`, see parallel.py); the model then sums the
row-parallel outputs (o_proj, down_proj) across the group and gathers the vocab-parallel logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tessera.agents.engine import ops
from tessera.agents.engine.attention import (
    AttentionMetadata,
    decode_attention,
    paged_prefill_attention,
    prefill_attention,
)
from tessera.agents.engine.config import LlamaConfig, rope_inverse_frequencies
from tessera.agents.engine.kv_cache import PagedKVCache
from tessera.agents.engine.parallel import TensorParallelGroup, row_parallel_linear
from tessera.agents.engine.weights import LlamaWeights


class LlamaModel:
    """A Llama-architecture decoder bound to its weights and a RoPE table.

    `config` is the shape this process computes: the whole model, or with `group` one rank's
    shard of it (the group sums its partial outputs).
    """

    def __init__(
        self,
        config: LlamaConfig,
        weights: LlamaWeights,
        max_positions: int | None = None,
        group: TensorParallelGroup | None = None,
    ) -> None:
        self.config = config
        self.weights = weights
        self.group = group
        self.max_positions = max_positions or config.max_position_embeddings
        inverse = rope_inverse_frequencies(config)
        positions = torch.arange(self.max_positions, dtype=torch.float32)
        angles = positions[:, None] * inverse[None, :]
        self.rope_cos = angles.cos().to(weights.device)
        self.rope_sin = angles.sin().to(weights.device)
        self.scale = config.head_dim**-0.5

    @property
    def device(self) -> torch.device:
        return self.weights.device

    @property
    def dtype(self) -> torch.dtype:
        return self.weights.dtype

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: PagedKVCache,
    ) -> torch.Tensor:
        """Hidden states after the final norm, [N, hidden], for N flattened tokens.

        Writes every token's K and V into the cache slots of `meta.slot_mapping`.
        """
        cfg = self.config
        heads, kv_heads, head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q_size = cfg.q_size
        tokens = input_ids.shape[0]
        hidden = F.embedding(input_ids, self.weights.embed)
        residual: torch.Tensor | None = None
        for index, layer in enumerate(self.weights.layers):
            x, residual = ops.rms_norm(hidden, layer.input_norm, cfg.rms_norm_eps, residual)
            qkv = F.linear(x, layer.qkv)
            k_cache, v_cache = kv_cache.key_cache(index), kv_cache.value_cache(index)
            ops.rope_and_cache(
                qkv, positions, self.rope_cos, self.rope_sin, meta.slot_mapping,
                k_cache, v_cache, heads, kv_heads, head_dim,
            )  # fmt: skip
            q = qkv[:, :q_size].view(tokens, heads, head_dim)
            attn = attend(q, qkv, meta, k_cache, v_cache, cfg, self.scale)
            hidden = row_parallel_linear(attn.reshape(tokens, q_size), layer.o, self.group)
            x, residual = ops.rms_norm(
                hidden, layer.post_attention_norm, cfg.rms_norm_eps, residual
            )
            hidden = row_parallel_linear(
                ops.silu_and_mul(F.linear(x, layer.gate_up)), layer.down, self.group
            )
        out, _ = ops.rms_norm(hidden, self.weights.final_norm, cfg.rms_norm_eps, residual)
        return out

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [M, vocab] for the rows of `hidden` that need sampling.

        Tensor-parallel: every rank calls it on the same rows; rank 0 gets the full logits,
        the other ranks their own vocabulary slice (which only rank 0's sampling reads).
        """
        local = F.linear(hidden, self.weights.lm_head).float()
        if self.group is None:
            return local
        gathered = self.group.gather_vocab(local, self.config.vocab_size)
        return local if gathered is None else gathered


def attend(
    q: torch.Tensor,
    qkv: torch.Tensor,
    meta: AttentionMetadata,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    config: LlamaConfig,
    scale: float,
) -> torch.Tensor:
    """One layer's attention for a flattened batch whose K/V are already in the cache.

    q: [N, heads, D]; qkv: the layer's [N, q | k | v] projections (a first prefill chunk
    attends over its fresh K/V from there). A function, not a method, because an attention
    worker (attention_worker.py) runs it over the KV it holds for a model it does not hold.
    """
    num_decode = meta.num_decode_tokens
    if not meta.prefill_spans:
        return decode_attention(q, k_cache, v_cache, meta, scale)
    q_size, kv_size = config.q_size, config.kv_size
    out = torch.empty_like(q)
    if num_decode:
        out[:num_decode] = decode_attention(q[:num_decode], k_cache, v_cache, meta, scale)
    for span in paged_prefill_attention(q, out, meta, k_cache, v_cache, scale):
        rows = slice(span.start, span.start + span.num_tokens)
        k = qkv[rows, q_size : q_size + kv_size].view(
            -1, config.num_key_value_heads, config.head_dim
        )
        v = qkv[rows, q_size + kv_size :].view(-1, config.num_key_value_heads, config.head_dim)
        out[rows] = prefill_attention(q[rows], k, v, span, k_cache, v_cache, scale)
    return out
