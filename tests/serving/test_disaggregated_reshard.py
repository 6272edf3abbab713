"""Prefill and decode servers of different tensor-parallel degrees and dtypes (issue 14): the
decode side re-shards each received KV package to its engine's layout and continues it.

Five `tessera serve` processes on the tiny checkpoint (CPU, gloo): prefill at TP 1 and TP 2
(float32), decode at TP 1 and TP 2 (float32) and at TP 1 in bfloat16. Every float32 pairing
must answer exactly the single-device engine's greedy tokens; the bfloat16 decode serves
complete answers from float32 KV (its KV equals the cast: tests/test_kv_reshard.py checks the
blocks). Requests go straight to a decode server, naming the prefill server in the
X-Tessera-Prefill header, as `tessera router` does.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx2 as httpx
import pytest
from conftest import (
    GREEDY_PROMPTS,
    SERVED_NAME,
    ServerProcess,
    free_port,
    start_server,
    stop_server,
)
from prometheus_client.parser import text_string_to_metric_families
from tessera.agents.router import PREFILL_HEADER

MAX_TOKENS = 10


@dataclass
class Pools:
    prefill_tp1: ServerProcess
    prefill_tp2: ServerProcess
    decode_tp1: ServerProcess
    decode_tp2: ServerProcess
    decode_bf16: ServerProcess


@pytest.fixture(scope="module")
def pools(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pools]:
    logs = tmp_path_factory.mktemp("pd-reshard")
    specs = {
        "prefill_tp1": ("--role=prefill", f"--kv-port={free_port()}"),
        "prefill_tp2": ("--role=prefill", f"--kv-port={free_port()}", "--tensor-parallel-size=2"),
        "decode_tp1": ("--role=decode",),
        "decode_tp2": ("--role=decode", "--tensor-parallel-size=2"),
        "decode_bf16": ("--role=decode", "--dtype=bf16"),
    }
    started: dict[str, ServerProcess] = {}
    with ThreadPoolExecutor(len(specs)) as pool:
        futures = {
            name: pool.submit(start_server, tiny_model, logs / f"{name}.log", *flags)
            for name, flags in specs.items()
        }
        errors = []
        for name, future in futures.items():
            try:
                started[name] = future.result()
            except Exception as error:  # stop the others before reporting it
                errors.append(error)
    try:
        if errors:
            raise errors[0]
        yield Pools(**started)
    finally:
        for server in started.values():
            stop_server(server)


def greedy_via(decode: ServerProcess, prefill: ServerProcess, prompt: list[int]) -> list[int]:
    response = httpx.post(
        f"{decode.base_url}/v1/completions",
        json={
            "model": SERVED_NAME,
            "prompt": prompt,
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
            "return_token_ids": True,
        },
        headers={PREFILL_HEADER: prefill.base_url},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    token_ids: list[int] = response.json()["choices"][0]["token_ids"]
    return token_ids


def outcomes(server: ServerProcess, metric: str) -> dict[str, float]:
    """`metric`'s samples by their outcome label."""
    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == metric:
                outcome = sample.labels["outcome"]
                found[outcome] = found.get(outcome, 0.0) + sample.value
    return found


@pytest.fixture(scope="module")
def expected(tiny_model: Path) -> list[list[int]]:
    from tessera.agents.engine import Engine, EngineConfig, SamplingParams

    engine = Engine.from_pretrained(tiny_model, EngineConfig(device="cpu"))
    params = SamplingParams(max_new_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    return [c.output_token_ids for c in engine.generate(GREEDY_PROMPTS, params)]


@pytest.mark.parametrize(
    ("decode", "prefill", "layout"),
    [
        ("decode_tp1", "prefill_tp2", "resharded"),
        ("decode_tp2", "prefill_tp1", "resharded"),
        ("decode_tp2", "prefill_tp2", "same"),
        ("decode_tp1", "prefill_tp1", "same"),
    ],
)
def test_pairs_of_any_degree_answer_the_colocated_greedy_tokens(
    pools: Pools, expected: list[list[int]], decode: str, prefill: str, layout: str
) -> None:
    decoder, prefiller = getattr(pools, decode), getattr(pools, prefill)
    before = outcomes(decoder, "tessera:kv_reshard_total").get(layout, 0.0)
    received = outcomes(decoder, "tessera:kv_transfer_received_total").get("ok", 0.0)
    answers = [greedy_via(decoder, prefiller, prompt) for prompt in GREEDY_PROMPTS]
    assert answers == expected
    # Each answer continued the prefill server's KV (none was recomputed on the decode side).
    assert outcomes(decoder, "tessera:kv_reshard_total")[layout] == before + len(GREEDY_PROMPTS)
    after = outcomes(decoder, "tessera:kv_transfer_received_total")["ok"]
    assert after == received + len(GREEDY_PROMPTS)


@pytest.mark.parametrize("prefill", ["prefill_tp1", "prefill_tp2"])
def test_a_bf16_decode_continues_float32_kv(pools: Pools, prefill: str) -> None:
    decoder = pools.decode_bf16
    before = outcomes(decoder, "tessera:kv_reshard_total").get("resharded", 0.0)
    for prompt in GREEDY_PROMPTS:
        assert len(greedy_via(decoder, getattr(pools, prefill), prompt)) == MAX_TOKENS
    resharded = outcomes(decoder, "tessera:kv_reshard_total")["resharded"]
    assert resharded == before + len(GREEDY_PROMPTS)
    assert "refused" not in outcomes(decoder, "tessera:kv_reshard_total")
