"""The agent protocol: checked-in generated code matches agent.proto, and version skew is safe.

Regenerate after editing api/agent/v1/agent.proto with `python -m tessera.api.agent.protogen`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tessera.api.agent import protogen
from tessera.api.agent.v1 import agent_pb2, agent_pb2_grpc


def test_generated_code_matches_the_proto(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools (a dev dependency) generates the code")
    generated = protogen.generate(tmp_path)
    for name, text in generated.items():
        checked_in = (protogen.PROTO_DIR / name).read_text()
        assert checked_in == text, (
            f"api/agent/v1/{name} is stale: run `python -m tessera.api.agent.protogen`"
        )


def test_generated_service_module_imports_messages_from_the_package() -> None:
    # protoc's default `import agent_pb2` would only work with api/agent/v1 on sys.path.
    source = Path(agent_pb2_grpc.__file__).read_text()
    assert "from tessera.api.agent.v1 import agent_pb2 as" in source
    assert "\nimport agent_pb2" not in source


def test_an_older_reader_keeps_fields_it_does_not_know() -> None:
    """An operator built from an older agent.proto must pass newer agents' fields through and
    read the fields it knows: simulate a newer sender by appending a field number v1 lacks."""
    message = agent_pb2.TelemetrySnapshot(schema_version=2, node_name="node-a", sequence=7)
    message.devices.add(uuid="GPU-0", power_w=312.5)
    # Field 99, wire type 2 (length-delimited): tag varint (99 << 3 | 2) = 0x9a 0x06, length 3.
    unknown_field = b"\x9a\x06\x03new"
    newer_bytes = message.SerializeToString() + unknown_field

    parsed = agent_pb2.TelemetrySnapshot.FromString(newer_bytes)

    assert parsed.node_name == "node-a" and parsed.sequence == 7
    assert parsed.devices[0].power_w == 312.5
    assert parsed.devices[0].HasField("power_w") and not parsed.devices[0].HasField("energy_j")
    assert parsed.SerializeToString().endswith(unknown_field)


def test_unmeasured_fields_are_absent_not_zero() -> None:
    sample = agent_pb2.DeviceSample(uuid="cpu-intel-rapl:0")
    assert not sample.HasField("temperature_c")
    sample.temperature_c = 0.0
    assert sample.HasField("temperature_c")


def test_instance_stats_carry_exactly_the_instance_samples_fields_both_ways() -> None:
    # proto_mapping maps instances by field name: a field added on one side only must fail here.
    from dataclasses import fields

    from tessera.agents.instance_stats import InstanceStats
    from tessera.agents.proto_mapping import instance_from_proto, instance_to_proto

    assert {f.name for f in fields(InstanceStats)} == set(
        agent_pb2.InstanceSample.DESCRIPTOR.fields_by_name
    )
    stats = InstanceStats(
        "i-1", "team/chat", "decode", ("GPU-a", "GPU-b"), 3, 7, 40, 60, 123.5, (0.1, 0.2), (0.01,),
        9, 1000,
    )  # fmt: skip
    message = agent_pb2.InstanceSample.FromString(instance_to_proto(stats).SerializeToString())
    assert instance_from_proto(message) == stats
    window = instance_from_proto(message, (0.3,), (0.02, 0.03))
    assert (window.ttft_samples_s, window.tpot_samples_s) == ((0.3,), (0.02, 0.03))
    assert window.queue_length == 3 and window.device_uuids == ("GPU-a", "GPU-b")
