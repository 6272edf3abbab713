"""The model's shape, read from a Hugging Face `config.json` (Llama architecture only).

The engine implements one architecture exactly (Llama: RMSNorm, RoPE, grouped-query attention,
SwiGLU); anything in a config that would change the arithmetic and is not implemented is
refused here, by name, rather than silently computed differently.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch


class UnsupportedModelError(ValueError):
    """The checkpoint's config asks for something this engine does not compute."""


class TensorParallelSizeError(ValueError):
    """A tensor-parallel degree that does not split the model's heads evenly."""


@dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama-3.1's frequency-dependent RoPE scaling (`rope_type: llama3`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class LlamaConfig:
    """The shape of a Llama-architecture decoder."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Llama3RopeScaling | None = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise UnsupportedModelError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise UnsupportedModelError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def group_size(self) -> int:
        """Query heads that share one key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes of K and V one token occupies in the cache, all layers."""
        return 2 * self.num_hidden_layers * self.kv_size * dtype_bytes

    @property
    def layer_parameter_count(self) -> int:
        """Parameters of the matrices of one decoder layer (norms included)."""
        h = self.hidden_size
        attention = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        mlp = 3 * h * self.intermediate_size
        return attention + mlp + 2 * h

    @property
    def decode_weight_parameter_count(self) -> int:
        """Parameters a decode step must read: every layer, the final norm and the LM head.

        The embedding table is not read whole (only the rows of the batch's tokens).
        """
        return (
            self.num_hidden_layers * self.layer_parameter_count
            + self.hidden_size
            + self.vocab_size * self.hidden_size
        )

    def tensor_parallel_shard(self, tensor_parallel_size: int) -> LlamaConfig:
        """The shape one of `tensor_parallel_size` ranks computes: a Llama with 1/TP of the
        query heads, key/value heads and MLP width, and the same hidden size and vocabulary.

        Megatron-style sharding keeps whole heads on a rank, so each rank's attention and its
        slice of the paged KV cache are those of this smaller model; only the row-parallel
        outputs (attention's o_proj, the MLP's down_proj) are summed across ranks. Raises
        TensorParallelSizeError naming the field that the degree does not divide.
        """
        tp = tensor_parallel_size
        if type(tp) is not int or tp < 1:
            raise TensorParallelSizeError(
                f"tensor_parallel_size must be an integer >= 1, got {tp!r}"
            )
        if tp == 1:
            return self
        sharded = ("num_attention_heads", "num_key_value_heads", "intermediate_size")
        for name in sharded:
            value = getattr(self, name)
            if value % tp:
                common = math.gcd(*(getattr(self, n) for n in sharded))
                valid = [d for d in range(1, common + 1) if common % d == 0]
                raise TensorParallelSizeError(
                    f"tensor_parallel_size {tp} does not divide {name} ({value}); "
                    f"valid sizes: {', '.join(map(str, valid))}"
                )
        return replace(
            self,
            num_attention_heads=self.num_attention_heads // tp,
            num_key_value_heads=self.num_key_value_heads // tp,
            intermediate_size=self.intermediate_size // tp,
        )

    @property
    def signature(self) -> str:
        """A short string that two engines must share to exchange KV blocks."""
        return (
            f"llama:L{self.num_hidden_layers}:H{self.hidden_size}:A{self.num_attention_heads}"
            f":KV{self.num_key_value_heads}:D{self.head_dim}:V{self.vocab_size}"
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LlamaConfig:
        """Read a Hugging Face config dictionary (transformers 4.x or 5.x layout)."""
        model_type = data.get("model_type", "llama")
        if model_type != "llama":
            raise UnsupportedModelError(f"model_type {model_type!r} is not 'llama'")
        for flag in ("attention_bias", "mlp_bias"):
            if data.get(flag):
                raise UnsupportedModelError(f"{flag}=true is not supported (Llama has none)")
        act = data.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"hidden_act {act!r} is not supported; only 'silu'")
        if data.get("pretraining_tp", 1) not in (1, None):
            raise UnsupportedModelError("pretraining_tp != 1 is not supported")
        heads = int(data["num_attention_heads"])
        hidden = int(data["hidden_size"])
        rope_theta, scaling = _read_rope(data)
        eos = data.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            vocab_size=int(data["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(data["intermediate_size"]),
            num_hidden_layers=int(data["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(data.get("num_key_value_heads") or heads),
            head_dim=int(data.get("head_dim") or hidden // heads),
            rms_norm_eps=float(data.get("rms_norm_eps", 1e-5)),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            max_position_embeddings=int(data.get("max_position_embeddings", 8192)),
            tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
            bos_token_id=data.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> LlamaConfig:
        """Read `config.json` from a local Hugging Face-layout folder."""
        config_path = Path(path) / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"no config.json in {path} (expected a Hugging Face folder)")
        return cls.from_dict(json.loads(config_path.read_text()))

    @classmethod
    def llama3_8b(cls) -> LlamaConfig:
        """Meta-Llama-3-8B's shape (for benchmarks with random weights)."""
        return cls(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            rms_norm_eps=1e-5,
            rope_theta=500000.0,
            max_position_embeddings=8192,
            bos_token_id=128000,
            eos_token_ids=(128001, 128009),
        )


def _read_rope(data: dict[str, Any]) -> tuple[float, Llama3RopeScaling | None]:
    # transformers 5 keeps theta and scaling in `rope_parameters`; 4.x in two top-level keys.
    params = data.get("rope_parameters") or data.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", data.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":
        return theta, Llama3RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    raise UnsupportedModelError(f"rope_type {rope_type!r} is not supported; 'default' or 'llama3'")


def rope_inverse_frequencies(config: LlamaConfig) -> torch.Tensor:
    """RoPE's inverse frequencies (float32), with Llama-3 scaling applied when configured.

    The same float32 operations as transformers' `_compute_llama3_parameters`, so that logits
    match it to rounding.
    """
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float32) / dim
    inv_freq = 1.0 / (config.rope_theta**exponents)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    old_context = scaling.original_max_position_embeddings
    low_wavelen = old_context / scaling.low_freq_factor
    high_wavelen = old_context / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_context / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)
