"""`tessera serve` and `tessera router` as benches start them: the real commands, random weights.

    python bench/random_weights_serve.py serve --model=NAME --weights-uri=FOLDER [serve flags]
    python bench/random_weights_serve.py router [router flags]

`serve` is the real server (agents/serving/cli.py: its flags and checks, warm-up, HTTP, the KV
transports of the prefill and decode roles) except that the engine's weights are made on its
device at random, in the shape of FOLDER/config.json (`random_llama_weights`), instead of read
from safetensors: a Llama-3-8B-shaped checkpoint is 16 GB to write and read on a lent GPU machine,
for timings that do not depend on the values. FOLDER needs only config.json and tokenizer.json
(`write_model_folder`). `router` is `tessera router` unchanged. Both run from a bare checkout
(checkout_layout), where the `tessera` entry point is not installed.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import checkout_layout  # noqa: F401  (links the package layout where it is not installed)

WEIGHTS_SEED = 0


def hf_config(config: Any) -> dict[str, Any]:
    """A Hugging Face config.json dictionary of a `LlamaConfig` (what `from_dict` reads)."""
    fields = asdict(config)
    if fields.get("rope_scaling") is not None:
        raise ValueError("hf_config: rope scaling is not written; give a config without it")
    eos = list(fields["eos_token_ids"])
    return {
        "model_type": "llama",
        "hidden_act": "silu",
        "vocab_size": fields["vocab_size"],
        "hidden_size": fields["hidden_size"],
        "intermediate_size": fields["intermediate_size"],
        "num_hidden_layers": fields["num_hidden_layers"],
        "num_attention_heads": fields["num_attention_heads"],
        "num_key_value_heads": fields["num_key_value_heads"],
        "head_dim": fields["head_dim"],
        "rms_norm_eps": fields["rms_norm_eps"],
        "rope_theta": fields["rope_theta"],
        "max_position_embeddings": fields["max_position_embeddings"],
        "tie_word_embeddings": fields["tie_word_embeddings"],
        "bos_token_id": fields["bos_token_id"],
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
    }


def write_model_folder(folder: Path, config: Any) -> None:
    """config.json of `config` and a word-level tokenizer covering its vocabulary."""
    from serve_load import word_level_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config(config)))
    word_level_tokenizer(folder, config.vocab_size)


def use_random_weights() -> None:
    """Make `Engine.from_pretrained` build the folder's shape with random weights on its
    device, as the in-process benches build their engines (`Engine(config, weights, ...)`):
    every process seeds them alike, so a prefill and a decode server hold the same model."""
    import torch
    from tessera.agents.engine import Engine, EngineConfig, LlamaConfig
    from tessera.agents.engine.weights import random_llama_weights

    def from_random(
        cls: type[Engine], path: Any, engine_config: EngineConfig | None = None
    ) -> Engine:
        ec = engine_config or EngineConfig()
        device = ec.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = ec.dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
        config = LlamaConfig.from_pretrained(path)
        return cls(config, random_llama_weights(config, device, dtype, seed=WEIGHTS_SEED), ec)

    Engine.from_pretrained = classmethod(from_random)


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in ("serve", "router"):
        print("usage: random_weights_serve.py serve|router [flags]", file=sys.stderr)
        raise SystemExit(2)
    if argv[0] == "serve":
        use_random_weights()
        from tessera.agents.serving.cli import serve_command

        serve_command.main(argv[1:], prog_name="tessera serve")
    else:
        from tessera.agents.router.cli import router_command

        router_command.main(argv[1:], prog_name="tessera router")


if __name__ == "__main__":
    main(sys.argv[1:])
