"""Weights of a Llama model: loaded from a local Hugging Face folder, or random for benchmarks.

Q/K/V and gate/up projections are concatenated at load time so that a layer runs two GEMMs
where the checkpoint has five matrices: fewer, larger matrix products are what keep a decode
step at the memory roof.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tessera.agents.engine.config import LlamaConfig


class WeightsError(ValueError):
    """A checkpoint lacks a tensor or holds one of the wrong shape."""


@dataclass
class LayerWeights:
    """One decoder layer. Matrices are [out_features, in_features], as in torch.nn.Linear."""

    input_norm: torch.Tensor
    qkv: torch.Tensor
    o: torch.Tensor
    post_attention_norm: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor


@dataclass
class LlamaWeights:
    """All of a model's parameters, on one device, in one dtype."""

    embed: torch.Tensor
    layers: list[LayerWeights]
    final_norm: torch.Tensor
    lm_head: torch.Tensor

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device


def _checkpoint_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(folder.glob("*.safetensors"))
    if not found:
        raise FileNotFoundError(f"no .safetensors files in {folder}")
    return found


def load_llama_weights(
    path: str | Path,
    config: LlamaConfig,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
) -> LlamaWeights:
    """Load a Hugging Face-layout safetensors checkpoint from a local folder (no network)."""
    folder = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    for file in _checkpoint_files(folder):
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open handles are not mappings)
                tensors[name] = handle.get_tensor(name)

    def take(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in tensors:
            raise WeightsError(f"checkpoint {folder} has no tensor {name!r}")
        tensor = tensors.pop(name)
        if tuple(tensor.shape) != shape:
            raise WeightsError(
                f"{name} in {folder} has shape {tuple(tensor.shape)}, config says {shape}"
            )
        return tensor.to(device=device, dtype=dtype)

    h, q, kv, inter = config.hidden_size, config.q_size, config.kv_size, config.intermediate_size
    layers = []
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        layers.append(
            LayerWeights(
                input_norm=take(prefix + "input_layernorm.weight", (h,)),
                qkv=torch.cat(
                    [
                        take(prefix + "self_attn.q_proj.weight", (q, h)),
                        take(prefix + "self_attn.k_proj.weight", (kv, h)),
                        take(prefix + "self_attn.v_proj.weight", (kv, h)),
                    ]
                ),
                o=take(prefix + "self_attn.o_proj.weight", (h, q)),
                post_attention_norm=take(prefix + "post_attention_layernorm.weight", (h,)),
                gate_up=torch.cat(
                    [
                        take(prefix + "mlp.gate_proj.weight", (inter, h)),
                        take(prefix + "mlp.up_proj.weight", (inter, h)),
                    ]
                ),
                down=take(prefix + "mlp.down_proj.weight", (h, inter)),
            )
        )
    embed = take("model.embed_tokens.weight", (config.vocab_size, h))
    if config.tie_word_embeddings or "lm_head.weight" not in tensors:
        if not config.tie_word_embeddings:
            raise WeightsError(f"checkpoint {folder} has no 'lm_head.weight' and ties none")
        lm_head = embed
    else:
        lm_head = take("lm_head.weight", (config.vocab_size, h))
    return LlamaWeights(
        embed=embed,
        layers=layers,
        final_norm=take("model.norm.weight", (h,)),
        lm_head=lm_head,
    )


def random_llama_weights(
    config: LlamaConfig,
    device: torch.device | str,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    std: float = 0.02,
) -> LlamaWeights:
    """Random weights made directly on `device` (benchmarks need no checkpoint).

    Normal(0, std) matrices and norms near one, so activations stay finite and nothing is zero
    (zeros can run faster than real data).
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    h, q, kv, inter = config.hidden_size, config.q_size, config.kv_size, config.intermediate_size

    def matrix(rows: int, cols: int) -> torch.Tensor:
        out = torch.empty(rows, cols, device=device, dtype=dtype)
        return out.normal_(0.0, std, generator=generator)

    def norm() -> torch.Tensor:
        return torch.empty(h, device=device, dtype=dtype).normal_(1.0, 0.05, generator=generator)

    layers = [
        LayerWeights(
            input_norm=norm(),
            qkv=matrix(q + 2 * kv, h),
            o=matrix(h, q),
            post_attention_norm=norm(),
            gate_up=matrix(2 * inter, h),
            down=matrix(h, inter),
        )
        for _ in range(config.num_hidden_layers)
    ]
    embed = matrix(config.vocab_size, h)
    lm_head = embed if config.tie_word_embeddings else matrix(config.vocab_size, h)
    return LlamaWeights(embed=embed, layers=layers, final_norm=norm(), lm_head=lm_head)
