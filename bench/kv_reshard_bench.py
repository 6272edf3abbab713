"""KV across tensor-parallel degrees: a TP=2 engine's export (rank 0 gathers the heads), the
re-shard on receipt, a TP=1 engine's import, and the reverse (rank 0 scatters the heads).

    python bench/kv_reshard_bench.py --out $OUT/kv_reshard           # 2 GPUs, about 2 minutes
    python bench/kv_reshard_bench.py --smoke --out /tmp/reshard_smoke  # CPU (gloo), tiny model

For each prompt length: the TP=2 engine prefills it and exports its KV (`export_ms`: the gather
over NCCL, the copy to the host, the checksums, the rank pipe); `reshard_ms` maps the package to
the TP=1 engine's layout (a relabel, after verifying the checksums) and `cast_ms` to float16
(what a decode pool in another dtype pays); `import_tp1_ms` is the TP=1 engine's import. Then a
TP=1 engine's package enters the TP=2 engine (`import_tp2_ms`: the pipe and the scatter), which
exports it back at once: `round_trip_exact` says those blocks are bit-identical. `tokens_match`
compares the TP=2 -> TP=1 continuation with the TP=1 engine's own greedy tokens (bfloat16 TP=2
sums in another order, so a late divergence is numerics, not a layout bug). The checkpoint is
random (a 1B-class Llama shape, 64 KiB of KV per token in bfloat16), written to /tmp first.
JSON: kv_reshard.json under --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import checkout_layout  # noqa: F401  (links the package layout where it is not installed)
import torch
from model_shapes import tiny_model

FULL = {
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 16384,
}
TINY = tiny_model(256, 1024)
LENGTHS = {True: (16, 64, 200), False: (1024, 4096, 8192)}
NEW_TOKENS = 16
BLOCK_SIZE = 16


def write_checkpoint(folder: Path, shape: dict[str, int], device: str) -> None:
    """A random Llama checkpoint (safetensors, bfloat16) in Hugging Face names."""
    from safetensors.torch import save_file

    h, q = shape["hidden_size"], shape["num_attention_heads"] * shape["head_dim"]
    kv, inter, vocab = (
        shape["num_key_value_heads"] * shape["head_dim"],
        shape["intermediate_size"],
        shape["vocab_size"],
    )
    generator = torch.Generator(device=device).manual_seed(0)

    def matrix(rows: int, cols: int, scale: float = 0.02) -> torch.Tensor:
        values = torch.randn(rows, cols, generator=generator, device=device) * scale
        return values.to(torch.bfloat16).cpu()

    tensors = {
        "model.embed_tokens.weight": matrix(vocab, h, 1.0),
        "lm_head.weight": matrix(vocab, h),
    }
    tensors["model.norm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    for i in range(shape["num_hidden_layers"]):
        layer = f"model.layers.{i}."
        tensors[layer + "input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        tensors[layer + "post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        tensors[layer + "self_attn.q_proj.weight"] = matrix(q, h)
        tensors[layer + "self_attn.k_proj.weight"] = matrix(kv, h)
        tensors[layer + "self_attn.v_proj.weight"] = matrix(kv, h)
        tensors[layer + "self_attn.o_proj.weight"] = matrix(h, q)
        tensors[layer + "mlp.gate_proj.weight"] = matrix(inter, h)
        tensors[layer + "mlp.up_proj.weight"] = matrix(inter, h)
        tensors[layer + "mlp.down_proj.weight"] = matrix(h, inter)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    config = {
        "model_type": "llama",
        "hidden_act": "silu",
        **shape,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    (folder / "config.json").write_text(json.dumps(config))


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(function: Any, *args: Any) -> tuple[Any, float]:
    synchronize()
    started = time.perf_counter()
    result = function(*args)
    synchronize()
    return result, (time.perf_counter() - started) * 1e3


def first_token(engine: Any, prompt: list[int], params: Any) -> str:
    request_id: str = engine.add_request(prompt, params)
    for _ in range(10_000):
        if any(o.request_id == request_id for o in engine.step()):
            return request_id
    raise RuntimeError("no first token")


def measure(smoke: bool, out: Path) -> dict[str, Any]:
    from tessera.agents.engine import Engine, EngineConfig, SamplingParams
    from tessera.agents.engine.kv_reshard import reshard
    from tessera.agents.engine.tp_engine import start_tensor_parallel_engine

    device = "cpu" if smoke else "cuda"
    dtype = torch.float32 if smoke else torch.bfloat16
    shape = TINY if smoke else FULL
    started = time.monotonic()
    folder = Path(tempfile.mkdtemp(prefix="kv-reshard-ckpt-"))
    write_checkpoint(folder, shape, "cpu" if smoke else "cuda")
    written_s = time.monotonic() - started
    lengths = LENGTHS[smoke]
    blocks = 2 * (max(lengths) + NEW_TOKENS) // BLOCK_SIZE + 8
    config = EngineConfig(
        device=device,
        dtype=dtype,
        block_size=BLOCK_SIZE,
        num_kv_blocks=blocks,
        max_model_len=shape["max_position_embeddings"],
        use_cuda_graphs=False,
    )
    tp2 = start_tensor_parallel_engine(folder, config, 2)
    tp1 = Engine.from_pretrained(
        folder, dataclasses.replace(config, device="cpu" if smoke else "cuda:0")
    )
    ready_s = time.monotonic() - started
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    generator = torch.Generator().manual_seed(1)
    rows: list[dict[str, Any]] = []
    record: dict[str, Any] = {
        "bench": "kv_reshard",
        "device": torch.cuda.get_device_name() if not smoke else "cpu",
        "smoke": smoke,
        "model": {**shape, "weights": "random", "dtype": str(dtype).removeprefix("torch.")},
        "kv_bytes_per_token": tp1.kv_geometry.block_nbytes // BLOCK_SIZE,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
        "command": " ".join(sys.argv),
        "checkpoint_written_s": round(written_s, 1),
        "engines_ready_s": round(ready_s, 1),
        "rows": rows,
    }
    print(
        f"{record['device']}: checkpoint {written_s:.0f} s, engines ready {ready_s:.0f} s",
        flush=True,
    )
    print(
        f"{'tokens':>7} {'KV MiB':>8} {'export':>9} {'reshard':>9} {'cast':>9} "
        f"{'imp TP1':>9} {'imp TP2':>9} exact match"
    )
    try:
        for length in lengths:
            prompt = torch.randint(3, shape["vocab_size"], (length,), generator=generator).tolist()
            expected = tp1.generate([prompt], params)[0].output_token_ids
            package, export_ms = timed(tp2.export_kv, first_token(tp2, prompt, params))
            mapped, reshard_ms = timed(reshard, package, tp1.kv_geometry)
            fp16 = dataclasses.replace(tp1.kv_geometry, dtype="float16")
            _, cast_ms = timed(reshard, package, fp16)
            request_id, import_tp1_ms = timed(tp1.import_kv, mapped)
            tp1.run_until_idle()
            continued = tp1.pop_finished(request_id).output_token_ids
            source = tp1.export_kv(first_token(tp1, prompt, params))
            into_tp2 = reshard(source, tp2.kv_geometry)
            request_id, import_tp2_ms = timed(tp2.import_kv, into_tp2)
            back = tp2.export_kv(request_id)
            row = {
                "prompt_tokens": length,
                "kv_mib": round(package.blocks.numel() * package.blocks.element_size() / 2**20, 2),
                "export_tp2_ms": round(export_ms, 2),
                "reshard_ms": round(reshard_ms, 2),
                "cast_fp16_ms": round(cast_ms, 2),
                "import_tp1_ms": round(import_tp1_ms, 2),
                "import_tp2_ms": round(import_tp2_ms, 2),
                "round_trip_exact": bool(torch.equal(back.blocks, source.blocks.cpu())),
                "tokens_match": sum(a == b for a, b in zip(continued, expected, strict=True)),
                "tokens": NEW_TOKENS,
            }
            rows.append(row)
            print(
                f"{length:7d} {row['kv_mib']:8.1f} {export_ms:8.1f}ms {reshard_ms:8.1f}ms "
                f"{cast_ms:8.1f}ms {import_tp1_ms:8.1f}ms {import_tp2_ms:8.1f}ms "
                f"{row['round_trip_exact']!s:5s} {row['tokens_match']}/{NEW_TOKENS}",
                flush=True,
            )
            out.mkdir(parents=True, exist_ok=True)
            (out / "kv_reshard.json").write_text(json.dumps(record, indent=1) + "\n")
    finally:
        tp2.close()
    record["wall_s"] = round(time.monotonic() - started, 1)
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for kv_reshard.json")
    parser.add_argument("--smoke", action="store_true", help="CPU (gloo), tiny model")
    args = parser.parse_args(argv)
    if not args.smoke and torch.cuda.device_count() < 2:
        print(
            "kv_reshard_bench: error: needs 2 CUDA devices; run with --smoke on a CPU",
            file=sys.stderr,
        )
        raise SystemExit(2)
    record = measure(args.smoke, args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kv_reshard.json").write_text(json.dumps(record, indent=1) + "\n")
    exact = all(row["round_trip_exact"] for row in record["rows"])
    print(
        f"wrote {args.out / 'kv_reshard.json'} in {record['wall_s']} s; round trips exact: {exact}"
    )
    if not exact:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
