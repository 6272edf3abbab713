"""Weights of a Llama model: loaded from a local Hugging Face folder, or random for benchmarks.

Q/K/V and gate/up projections are concatenated at load time so that a layer runs two GEMMs
where the checkpoint has five matrices: fewer, larger matrix products are what keep a decode
step at the memory roof.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tessera.agents.engine.config import LlamaConfig
from tessera.agents.engine.parallel import TensorParallelShard


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


class _Checkpoint:
    """The tensors of a checkpoint's files, read by slice: a tensor-parallel rank reads only
    its rows or columns of each matrix (safetensors maps the file; the rest is never copied)."""

    def __init__(self, folder: Path, stack: ExitStack) -> None:
        self.folder = folder
        self.handles: dict[str, Any] = {}
        for file in _checkpoint_files(folder):
            handle = stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
            for name in handle.keys():  # noqa: SIM118 (safe_open handles are not mappings)
                self.handles[name] = handle

    def __contains__(self, name: str) -> bool:
        return name in self.handles

    def read(
        self,
        name: str,
        shape: tuple[int, ...],
        rows: slice | None = None,
        cols: slice | None = None,
    ) -> torch.Tensor:
        """Tensor `name`, checked to have the full `shape`, cut to `rows` / `cols`."""
        if name not in self.handles:
            raise WeightsError(f"checkpoint {self.folder} has no tensor {name!r}")
        part = self.handles[name].get_slice(name)
        found = tuple(part.get_shape())
        if found != shape:
            raise WeightsError(f"{name} in {self.folder} has shape {found}, config says {shape}")
        if cols is not None:
            return part[rows or slice(None), cols]
        if rows is not None:
            return part[rows]
        return part[:]


def load_llama_weights(
    path: str | Path,
    config: LlamaConfig,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    shard: TensorParallelShard | None = None,
) -> LlamaWeights:
    """Load a Hugging Face-layout safetensors checkpoint from a local folder (no network).

    With `shard`, only that tensor-parallel rank's slices (see parallel.py): the matrices have
    the shape of `config.tensor_parallel_shard(shard.size)` and the LM head its vocabulary rows.
    """
    folder = Path(path)
    shard = shard or TensorParallelShard(0, 1)
    h, q, kv, inter = config.hidden_size, config.q_size, config.kv_size, config.intermediate_size
    q_rows, kv_rows, inter_rows = shard.even(q), shard.even(kv), shard.even(inter)
    with ExitStack() as stack:
        checkpoint = _Checkpoint(folder, stack)

        def take(
            name: str, shape: tuple[int, ...], rows: slice | None = None, cols: slice | None = None
        ) -> torch.Tensor:
            return checkpoint.read(name, shape, rows, cols).to(device=device, dtype=dtype)

        layers = []
        for i in range(config.num_hidden_layers):
            attn, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
            layers.append(
                LayerWeights(
                    input_norm=take(f"model.layers.{i}.input_layernorm.weight", (h,)),
                    qkv=torch.cat(
                        [
                            take(attn + "q_proj.weight", (q, h), rows=q_rows),
                            take(attn + "k_proj.weight", (kv, h), rows=kv_rows),
                            take(attn + "v_proj.weight", (kv, h), rows=kv_rows),
                        ]
                    ),
                    o=take(attn + "o_proj.weight", (h, q), cols=q_rows),
                    post_attention_norm=take(
                        f"model.layers.{i}.post_attention_layernorm.weight", (h,)
                    ),
                    gate_up=torch.cat(
                        [
                            take(mlp + "gate_proj.weight", (inter, h), rows=inter_rows),
                            take(mlp + "up_proj.weight", (inter, h), rows=inter_rows),
                        ]
                    ),
                    down=take(mlp + "down_proj.weight", (h, inter), cols=inter_rows),
                )
            )
        embed = take("model.embed_tokens.weight", (config.vocab_size, h))
        vocab_rows = shard.vocab(config.vocab_size)
        if config.tie_word_embeddings or "lm_head.weight" not in checkpoint:
            if not config.tie_word_embeddings:
                raise WeightsError(f"checkpoint {folder} has no 'lm_head.weight' and ties none")
            lm_head = embed[vocab_rows]
        else:
            lm_head = take("lm_head.weight", (config.vocab_size, h), rows=vocab_rows)
        final_norm = take("model.norm.weight", (h,))
    return LlamaWeights(embed=embed, layers=layers, final_norm=final_norm, lm_head=lm_head)


def random_llama_weights(
    config: LlamaConfig,
    device: torch.device | str,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    std: float = 0.02,
    shard: TensorParallelShard | None = None,
) -> LlamaWeights:
    """Random weights made directly on `device` (benchmarks need no checkpoint).

    Normal(0, std) matrices and norms near one, so activations stay finite and nothing is zero
    (zeros can run faster than real data). With `shard`, one tensor-parallel rank's slices in
    their shapes (the values are not slices of one model: the shapes are what a benchmark needs).
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    shard = shard or TensorParallelShard(0, 1)
    vocab_rows = shard.vocab(config.vocab_size)
    config = config.tensor_parallel_shard(shard.size)
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
    if config.tie_word_embeddings:
        lm_head = embed[vocab_rows]
    else:
        lm_head = matrix(vocab_rows.stop - vocab_rows.start, h)
    return LlamaWeights(embed=embed, layers=layers, final_norm=norm(), lm_head=lm_head)
