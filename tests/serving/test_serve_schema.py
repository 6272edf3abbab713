"""schemathesis over `tessera serve`'s own OpenAPI document: no generated request gets a 5xx.

Valid and invalid requests (GenerationMode.all) are generated for every operation and sent to
the real server process; bounded to a few examples each so the test stays fast on 2 cores.
"""

from __future__ import annotations

from collections import Counter

import schemathesis
from conftest import ServerProcess
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

EXAMPLES_PER_OPERATION = 12


def test_no_generated_request_gets_a_server_error(server: ServerProcess) -> None:
    schema = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    paths = {op.path for op in operations}
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/ready"} <= paths
    failures: list[str] = []
    statuses: Counter[tuple[str, int]] = Counter()
    for operation in operations:
        strategy = st.one_of(
            operation.as_strategy(GenerationMode.POSITIVE),
            operation.as_strategy(GenerationMode.NEGATIVE),
        )

        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=strategy)
        def call(case: schemathesis.Case) -> None:
            response = case.call(base_url=server.base_url, timeout=60)
            statuses[(case.path, response.status_code)] += 1
            if response.status_code >= 500:
                failures.append(
                    f"{case.method} {case.path} {case.body!r} -> {response.status_code} "
                    f"{response.text[:300]}"
                )

        call()
    assert not failures, "\n".join(failures)
    print(dict(statuses))
    for path in ("/v1/completions", "/v1/chat/completions"):
        assert statuses[(path, 400)] > 0, statuses  # invalid bodies were sent
    assert server.process.poll() is None, "the server died under generated requests"
