"""`tessera serve`: the flags, checked, and the server started.

This click command is the parser of the engine's arguments: every flag `operator/render.py`
puts in a pod (`engine_args`, `scheduler_args`) is one of these, and a test parses each rendered
pod's arguments with it. The flag names are vLLM's where vLLM has the flag. Importing this
module costs only click; the server's dependencies (the `serve` extra) load when it runs.

Bad input is a one-line error naming the flag, exit status 2: a flag out of range, weights
that are not a local folder (`s3://`, `hf://`, `gs://` cannot be fetched by the server; mount
them), a role this engine does not serve yet, a tensor-parallel degree that does not divide the
model's heads.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlparse

import click

ROLES = ("colocated", "prefill", "decode", "attention")
SERVED_ROLES = ("colocated", "prefill", "decode", "attention")
ATTENTION_CLIENT_ROLES = ("colocated", "decode")
DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32", "fp8", "bfloat16", "float16", "float32")
DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
LOCAL_SCHEMES = ("", "file")
SERVE_MODULES = ("fastapi", "uvicorn", "tokenizers", "jinja2", "torch", "safetensors")


def fail(message: str) -> NoReturn:
    """One line on stderr and exit status 2 (a usage error)."""
    click.echo(f"tessera serve: error: {message}", err=True)
    raise SystemExit(2)


def weights_folder(weights_uri: str | None, model: str) -> Path:
    """The local Hugging Face folder to load: --weights-uri, else --model if it is a folder."""
    if weights_uri is None:
        if Path(model).is_dir():
            return Path(model)
        fail(f"--weights-uri: not given, and --model {model!r} is no local folder")
    parsed = urlparse(weights_uri)
    if parsed.scheme not in LOCAL_SCHEMES:
        fail(
            f"--weights-uri {weights_uri}: scheme {parsed.scheme!r} cannot be fetched by "
            "tessera serve; give a local folder (mount the weights, e.g. from an init container)"
        )
    folder = Path(parsed.path if parsed.scheme == "file" else weights_uri)
    if not (folder / "config.json").is_file():
        fail(f"--weights-uri {weights_uri}: no config.json there (a Hugging Face folder)")
    if not (folder / "tokenizer.json").is_file():
        fail(f"--weights-uri {weights_uri}: no tokenizer.json there (a fast tokenizer)")
    return folder


def check_serve_extra() -> None:
    import importlib.util

    missing = [name for name in SERVE_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        fail(
            f"tessera serve needs the 'serve' extra ({', '.join(missing)} missing): "
            "pip install 'tessera-operator[serve]'"
        )


@click.command("serve")
@click.option("--model", required=True, help="Model name (or its local folder).")
@click.option("--weights-uri", default=None, help="Local Hugging Face folder (or file:// URI).")
@click.option("--served-model-name", default=None, help="Name in the API (default: --model).")
@click.option("--role", type=click.Choice(ROLES), default="colocated", show_default=True)
@click.option("--pool", default=lambda: os.environ.get("TESSERA_POOL", ""), help="Pool label.")
@click.option(
    "--instance-id",
    default=None,
    help="Name in the node agent's telemetry (default: $POD_NAME, else host:port).",
)
@click.option("--tensor-parallel-size", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--host", default="0.0.0.0", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default="auto", show_default=True)
@click.option("--device", default=None, help="torch device (default: cuda if present, else cpu).")
@click.option("--max-model-len", type=click.IntRange(min=2), default=None, help="Context limit.")
@click.option("--max-num-seqs", type=click.IntRange(min=1), default=256, show_default=True)
@click.option(
    "--max-num-batched-tokens", type=click.IntRange(min=1), default=2048, show_default=True
)
@click.option("--enable-chunked-prefill/--no-enable-chunked-prefill", default=True)
@click.option("--prefill-service", default=None, help="host:port of the prefill pool (decode).")
@click.option(
    "--attention-service",
    default=None,
    help="host:port of the attention pool that holds this replica's KV and runs its attention "
    "(attention offload; decode or colocated role).",
)
@click.option(
    "--kv-port",
    type=click.IntRange(1, 65535),
    default=None,
    help="Prefill role: TCP port of the KV channels; attention role: where decode replicas "
    "open their attention session (default: --port + 1).",
)
@click.option(
    "--fault-corrupt-kv-every",
    type=click.IntRange(min=0),
    default=0,
    hidden=True,
    help="TEST HOOK (prefill role): flip one bit in every Nth KV package sent; 0: never.",
)
@click.option(
    "--migration-port",
    type=click.IntRange(0, 65535),
    default=0,
    show_default=True,
    help="Colocated and decode roles: TCP port of incoming live migrations (0: any free port, "
    "published on GET /internal/migration).",
)
@click.option(
    "--migration-attach-timeout-s",
    type=click.FloatRange(0.1, 600),
    default=15.0,
    show_default=True,
    help="A request migrated here that the router does not attach to in this time is aborted.",
)
@click.option(
    "--migration-test-faults",
    is_flag=True,
    default=False,
    hidden=True,
    help="TEST HOOK: POST /internal/migrate takes a test_fault.",
)
@click.option("--block-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--num-kv-blocks", type=click.IntRange(min=1), default=None)
@click.option(
    "--kv-cache-memory-fraction",
    type=click.FloatRange(0, 1, min_open=True),
    default=0.85,
    show_default=True,
)
@click.option(
    "--gpu-memory-fraction",
    type=click.FloatRange(0, 1, min_open=True),
    default=None,
    help="This process's share of its GPU's memory (torch's per-process limit), for engines "
    "that share one GPU; needs --num-kv-blocks (a KV cache sized from free memory would not "
    "see the share). Default: no limit.",
)
@click.option(
    "--max-waiting-requests",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="Queue bound; beyond it requests get 429 with Retry-After.",
)
@click.option(
    "--request-timeout-s",
    type=click.FloatRange(min=0),
    default=600.0,
    show_default=True,
    help="Per-request limit, queue included (0: none).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
def serve_command(**flags: Any) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (colocated, prefill or decode role)."""
    config = build_config(flags)
    if flags["gpu_memory_fraction"] is not None:
        limit_gpu_memory(flags["gpu_memory_fraction"], config.device)
    import logging

    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    if config.role == "attention":
        from tessera.agents.serving.attention import run_attention

        raise SystemExit(run_attention(config))
    from tessera.agents.serving.server import run

    raise SystemExit(run(config))


def build_config(flags: dict[str, Any]) -> Any:
    """Check what parsing cannot (files, roles, lengths) and build the ServeConfig."""
    if flags["role"] not in SERVED_ROLES:
        fail(f"--role {flags['role']}: not served yet; one of {', '.join(SERVED_ROLES)}")
    if flags["fault_corrupt_kv_every"] and flags["role"] != "prefill":
        fail("--fault-corrupt-kv-every: a test hook of the prefill role only")
    kv_port = flags["kv_port"] or flags["port"] + 1
    if kv_port > 65535 or kv_port == flags["port"]:
        fail(f"--kv-port {kv_port}: must be in 1..65535 and differ from --port")
    attention_service = flags["attention_service"]
    if attention_service is not None:
        if flags["role"] not in ATTENTION_CLIENT_ROLES:
            fail(
                f"--attention-service: the {flags['role']} role runs no attention of its own to "
                f"offload; give it with --role {' or '.join(ATTENTION_CLIENT_ROLES)}"
            )
        check_host_port("--attention-service", attention_service)
        if flags["tensor_parallel_size"] > 1:
            fail(
                f"--attention-service: offloaded attention runs at --tensor-parallel-size 1, "
                f"not {flags['tensor_parallel_size']}"
            )
    check_gpu_memory_fraction(flags)
    dtype = DTYPE_ALIASES.get(flags["dtype"], flags["dtype"])
    if dtype == "fp8":
        fail("--dtype fp8: not supported by the Tessera engine; bf16, fp16 or fp32")
    folder = weights_folder(flags["weights_uri"], flags["model"])
    check_serve_extra()
    model_max = int(
        json.loads((folder / "config.json").read_text()).get("max_position_embeddings", 8192)
    )
    max_model_len = flags["max_model_len"] or model_max
    if max_model_len > model_max:
        fail(f"--max-model-len {max_model_len}: above the model's {model_max} positions")
    check_tensor_parallel(flags["tensor_parallel_size"], folder, flags["device"])
    from tessera.agents.engine import SchedulerConfig
    from tessera.agents.serving.server import ServeConfig

    timeout = flags["request_timeout_s"]
    return ServeConfig(
        weights=folder,
        model_name=flags["served_model_name"] or flags["model"],
        instance_id=flags["instance_id"]
        or os.environ.get("POD_NAME")
        or f"{socket.gethostname()}:{flags['port']}",
        host=flags["host"],
        port=flags["port"],
        max_model_len=max_model_len,
        pool=flags["pool"],
        role=flags["role"],
        dtype=None if dtype == "auto" else dtype,
        device=flags["device"],
        scheduler=SchedulerConfig(
            max_num_seqs=flags["max_num_seqs"],
            max_num_batched_tokens=flags["max_num_batched_tokens"],
            enable_chunked_prefill=flags["enable_chunked_prefill"],
        ),
        block_size=flags["block_size"],
        num_kv_blocks=flags["num_kv_blocks"],
        kv_cache_memory_fraction=flags["kv_cache_memory_fraction"],
        max_waiting_requests=flags["max_waiting_requests"],
        request_timeout_s=timeout or None,
        seed=flags["seed"],
        log_level=flags["log_level"],
        tensor_parallel_size=flags["tensor_parallel_size"],
        kv_port=kv_port,
        prefill_service=flags["prefill_service"],
        attention_service=attention_service,
        fault_corrupt_kv_every=flags["fault_corrupt_kv_every"],
        migration_port=flags["migration_port"],
        migration_test_faults=flags["migration_test_faults"],
        migration_attach_timeout_s=flags["migration_attach_timeout_s"],
    )


def check_gpu_memory_fraction(flags: dict[str, Any]) -> None:
    """A memory share applies to this process's allocator only: the KV cache must be sized
    for it (--num-kv-blocks), and tensor-parallel ranks are other processes."""
    fraction = flags["gpu_memory_fraction"]
    if fraction is None:
        return
    flag = f"--gpu-memory-fraction {fraction}"
    if flags["device"] is not None and not str(flags["device"]).startswith("cuda"):
        fail(f"{flag}: the engine runs on {flags['device']}, not a GPU; drop the flag")
    if flags["num_kv_blocks"] is None:
        fail(f"{flag}: give --num-kv-blocks too (sized for the share)")
    if flags["tensor_parallel_size"] > 1:
        fail(f"{flag}: one process's share; not with --tensor-parallel-size > 1")


def limit_gpu_memory(fraction: float, device: str | None) -> None:
    """Cap this process's CUDA allocations at `fraction` of the GPU's memory before anything
    is loaded, so that two engines on one GPU cannot take each other's memory."""
    import torch

    if not torch.cuda.is_available():
        fail(f"--gpu-memory-fraction {fraction}: no CUDA device in this process")
    index = torch.device(device or "cuda").index
    torch.cuda.set_per_process_memory_fraction(
        fraction, index if index is not None else torch.cuda.current_device()
    )


def check_host_port(flag: str, value: str) -> None:
    """`host:port` with a port in 1..65535 (the form the operator renders)."""
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        fail(f"{flag} {value!r}: give host:port with a port in 1..65535")


def check_tensor_parallel(size: int, folder: Path, device: str | None) -> None:
    """A degree must split the model's heads, and its ranks take cuda:0..N-1 or the CPU. Any
    role may be tensor-parallel: prefill and decode re-shard KV heads on receipt."""
    if size == 1:
        return
    from tessera.agents.engine.config import LlamaConfig, TensorParallelSizeError

    try:
        LlamaConfig.from_pretrained(folder).tensor_parallel_shard(size)
    except TensorParallelSizeError as error:
        fail(f"--tensor-parallel-size {size}: {error}")
    if device not in (None, "cpu", "cuda"):
        fail(f"--device {device}: with --tensor-parallel-size {size} give cuda or cpu")
