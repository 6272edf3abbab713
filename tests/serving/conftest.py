"""Fixtures of the serving tests: a tiny random Llama checkpoint with a tokenizer trained here,
and `tessera serve` running on it as a real process on a loopback port.

The checkpoint is transformers' `LlamaForCausalLM` with random weights; the tokenizer is a BPE
trained with Hugging Face `tokenizers` on the text below, with a chat template in
`tokenizer_config.json`. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx2 as httpx
import pytest
from engine_helpers import write_checkpoint
from ports import free_port

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'developer', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CORPUS = """\
The operator plans each model deployment and applies one deployment per pool.
Prefill is compute bound and decode is memory bound; the cheapest hardware for one is
rarely the cheapest for the other. A node agent reads telemetry and applies power limits.
The engine keeps a paged key value cache, batches requests continuously and chunks prompts.
Hello there, how are you today? I am fine, thank you. What is the weather like in the city?
It is sunny and warm, with a light wind from the sea. Tell me a story about a small robot.
Once upon a time a small robot learned to count tokens, one at a time, very quickly.
"""
MAX_MODEL_LEN = 2048
MAX_NUM_SEQS = 4
MAX_WAITING = 8
SERVED_NAME = "tiny-chat"


def train_tokenizer(folder: Path) -> int:
    """Write tokenizer.json and tokenizer_config.json; returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS)
    tokenizer.train_from_iterator(CORPUS.splitlines() * 4, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "chat_template": CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return int(tokenizer.get_vocab_size())


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face folder: random Llama weights, a trained tokenizer, a chat template."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    vocab = train_tokenizer(folder)
    write_checkpoint(folder, vocab_size=vocab, max_position_embeddings=MAX_MODEL_LEN)
    return folder


def tessera_command() -> list[str]:
    """The installed `tessera` entry point of this environment."""
    script = Path(sys.executable).parent / "tessera"
    return [str(script)] if script.exists() else [sys.executable, "-m", "tessera"]


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    base_url: str
    log: Path

    def metrics(self) -> dict[str, float]:
        """`name{labels}` -> value of every sample in /metrics."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.base_url}/metrics", timeout=10).text
        samples: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                extra = {
                    k: v for k, v in sample.labels.items() if k in ("reason", "finished_reason")
                }
                key = sample.name + "".join(f"{{{k}={v}}}" for k, v in sorted(extra.items()))
                if "le" not in sample.labels:
                    samples[key] = samples.get(key, 0.0) + sample.value
        return samples


def start_server(model: Path, log: Path, *extra: str, deadline_s: float = 90.0) -> ServerProcess:
    """`tessera serve` on a free loopback port, once /ready answers 200."""
    port = free_port()
    args = [
        *tessera_command(),
        "serve",
        f"--model={SERVED_NAME}",
        f"--weights-uri={model}",
        "--host=127.0.0.1",
        f"--port={port}",
        "--dtype=fp32",
        "--device=cpu",
        "--pool=colocated-cpu",
        f"--max-num-seqs={MAX_NUM_SEQS}",
        f"--max-waiting-requests={MAX_WAITING}",
        "--num-kv-blocks=512",
        *extra,
    ]
    env = {**os.environ, "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    return wait_ready(process, port, log, "tessera serve", deadline_s, every_s=0.2)


def wait_ready(
    process: subprocess.Popen[bytes],
    port: int,
    log: Path,
    what: str,
    deadline_s: float,
    every_s: float,
) -> ServerProcess:
    """Poll `process`'s /ready on `port` until it answers 200; fail (and kill it) when it exits
    or the deadline passes, with its log."""
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{what} exited {process.returncode}: {log.read_text()}")
        try:
            if httpx.get(f"{base_url}/ready", timeout=2).status_code == 200:
                return ServerProcess(process, base_url, log)
        except httpx.TransportError:
            pass
        time.sleep(every_s)  # polling /ready, with the deadline above
    process.kill()
    raise AssertionError(f"{what} not ready in {deadline_s} s: {log.read_text()}")


GREEDY_PROMPTS = [[1, 17, 42, 99, 7, 123, 56], [1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]]
"""Two prompts of different lengths, for the tests that compare a served variant's tokens."""


def local_greedy(model: Path, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """The single-device CPU engine's greedy tokens for `prompts`: what a server that splits
    the work (tensor parallel, offloaded attention) must reproduce."""
    import torch
    from tessera.agents.engine import Engine, EngineConfig, SamplingParams

    engine = Engine.from_pretrained(model, EngineConfig(device="cpu", dtype=torch.float32))
    params = SamplingParams(max_new_tokens=max_tokens, temperature=0.0)
    return [c.output_token_ids for c in engine.generate(prompts, params)]


def greedy(server: ServerProcess, prompt: list[int], max_tokens: int) -> list[int]:
    """The token ids `server` answers `prompt` with at temperature 0 (/v1/completions)."""
    response = httpx.post(
        f"{server.base_url}/v1/completions",
        json={
            "model": SERVED_NAME,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "return_token_ids": True,
        },
        timeout=60,
    )
    assert response.status_code == 200, response.text
    token_ids: list[int] = response.json()["choices"][0]["token_ids"]
    return token_ids


def stop_server(server: ServerProcess) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait(timeout=5)


@pytest.fixture(scope="session")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    running = start_server(tiny_model, log)
    yield running
    stop_server(running)
