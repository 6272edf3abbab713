"""An attention-offload plan, rendered: the attention pool is linked to its decode pool by the
plan (`attentionFor`), runs `tessera serve --role attention`, and its decode pool's pods are
given the attention workers' address. Arguments are parsed with the real `tessera serve`
parser; objects are checked against the Kubernetes schemas. No API server."""

from __future__ import annotations

import re
from typing import Any

import kubernetes_validate
import pytest
from api_samples import chat_deployment, example_classes
from pydantic import ValidationError
from tessera.agents.serving import cli as serve_cli
from tessera.api.model_deployment import ModelDeploymentSpec, Plan, PoolPlan, PoolRole
from tessera.operator import render
from tessera.policies.capacity import ClassOffer
from tessera.policies.placement import plan_deployment

OWNER = render.Owner(name="chat", namespace="serving", uid="3f6b8f0e-0000-4000-8000-000000000002")
KUBERNETES_VERSION = kubernetes_validate.utils.latest_version()


def offload_spec() -> ModelDeploymentSpec:
    document = chat_deployment()
    document["spec"]["servingMode"] = "attention-offload"
    return ModelDeploymentSpec.model_validate(document["spec"])


def parsed(args: list[str]) -> dict[str, Any]:
    context = serve_cli.serve_command.make_context("serve", list(args))
    return dict(context.params)


def test_the_plan_links_each_attention_pool_to_its_decode_pool() -> None:
    plan = plan_deployment(offload_spec(), [ClassOffer(n, s) for n, s in example_classes().items()])
    attention = [p for p in plan.pools if p.role is PoolRole.ATTENTION]
    decode = {p.name for p in plan.pools if p.role is PoolRole.DECODE}
    assert attention, plan.rationale
    for pool in attention:
        assert pool.attention_for in decode
        assert plan.attention_pool_for(pool.attention_for) == pool
    dumped = plan.model_dump(mode="json", by_alias=True)
    assert any("attentionFor" in p for p in dumped["pools"])


def test_decode_pods_get_the_attention_service_their_workers_listen_on() -> None:
    spec = offload_spec()
    plan = plan_deployment(spec, [ClassOffer(n, s) for n, s in example_classes().items()])
    children = render.render_children(OWNER, spec, plan, example_classes())
    for child in children:
        kubernetes_validate.validate(child, KUBERNETES_VERSION, strict=True)
    deployments = {c["metadata"]["name"]: c for c in children if c["kind"] == "Deployment"}
    services = {c["metadata"]["name"]: c for c in children if c["kind"] == "Service"}
    for pool in plan.pools:
        if pool.role is not PoolRole.ATTENTION:
            continue
        decode_pool = next(p for p in plan.pools if p.name == pool.attention_for)
        worker = deployments[render.workload_name(OWNER, pool)]["spec"]["template"]["spec"]
        worker_args = parsed(worker["containers"][0]["args"])
        assert worker_args["role"] == "attention"
        session_port = next(
            p["containerPort"] for p in worker["containers"][0]["ports"] if p["name"] == "attention"
        )
        assert worker_args["kv_port"] == session_port
        # The Service the decode pods are given selects exactly these workers, on that port.
        decode = deployments[render.workload_name(OWNER, decode_pool)]["spec"]["template"]
        decode_args = parsed(decode["spec"]["containers"][0]["args"])
        host, _, port = decode_args["attention_service"].rpartition(":")
        service_name, namespace = host.split(".")[:2]
        assert namespace == OWNER.namespace
        service = services[service_name]["spec"]
        assert service["clusterIP"] == "None"
        assert service["ports"][0]["port"] == int(port) == session_port
        assert service["ports"][0]["targetPort"] == "attention"
        labels = deployments[render.workload_name(OWNER, pool)]["spec"]["template"]["metadata"]
        assert service["selector"].items() <= labels["labels"].items()
        assert decode_args["role"] == "decode"


def test_pools_without_offload_get_no_attention_service() -> None:
    document = chat_deployment()
    document["spec"]["servingMode"] = "colocated"
    spec = ModelDeploymentSpec.model_validate(document["spec"])
    plan = plan_deployment(spec, [ClassOffer(n, s) for n, s in example_classes().items()])
    children = render.render_children(OWNER, spec, plan, example_classes())
    for child in children:
        if child["kind"] == "Deployment":
            args = child["spec"]["template"]["spec"]["containers"][0]["args"]
            assert parsed(args)["attention_service"] is None


def pool(name: str, role: PoolRole, attention_for: str | None = None) -> PoolPlan:
    return PoolPlan(
        name=name,
        role=role,
        accelerator_class="h100",
        tensor_parallel=1,
        replicas=1,
        attention_for=attention_for,
    )


@pytest.mark.parametrize(
    ("pools", "message"),
    [
        ([pool("d", PoolRole.DECODE), pool("a", PoolRole.ATTENTION)], "pools[a].attentionFor"),
        (
            [pool("d", PoolRole.DECODE), pool("a", PoolRole.ATTENTION, "p")],
            "'p' must name a decode pool of this plan (d)",
        ),
        ([pool("d", PoolRole.DECODE, "d")], "pools[d].attentionFor: only attention pools"),
    ],
)
def test_an_attention_pool_must_name_a_decode_pool_of_its_plan(
    pools: list[PoolPlan], message: str
) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        Plan(mode="attention-offload", pools=pools, cost_per_hour=0, power_w=0, rationale="t")


def test_host_memory_attention_runs_beside_the_engine_in_each_decode_pod() -> None:
    """A host's DRAM is only reachable from its own pods: the worker is a sidecar of every
    decode pod (one per replica, on 127.0.0.1), with no Deployment or Service of its own."""
    from tessera.policies.host_memory import host_memory_class

    spec = offload_spec()
    host = host_memory_class(
        name="node", memory_gib=1024, dram_bandwidth_gbps=300, link_gbps=20, cpu_bf16_tflops=20
    )
    all_classes = {**example_classes(), "host": host}
    decode = PoolPlan(
        name="decode-h100", role=PoolRole.DECODE, accelerator_class="h100",
        tensor_parallel=1, replicas=3,
    )  # fmt: skip
    attention = PoolPlan(
        name="attention-host", role=PoolRole.ATTENTION, accelerator_class="host",
        tensor_parallel=1, replicas=3, attention_for="decode-h100",
    )  # fmt: skip
    prefill = decode.model_copy(update={"name": "prefill-h100", "role": PoolRole.PREFILL})
    plan = Plan(
        mode="attention-offload",
        pools=[prefill, decode, attention],
        cost_per_hour=0,
        power_w=0,
        rationale="t",
    )
    children = render.render_children(OWNER, spec, plan, all_classes)
    for child in children:
        kubernetes_validate.validate(child, KUBERNETES_VERSION, strict=True)
    names = {c["metadata"]["name"] for c in children}
    assert render.workload_name(OWNER, attention) not in names
    assert render.attention_service_name(OWNER, attention) not in names
    pod = next(c for c in children if c["metadata"]["name"] == render.workload_name(OWNER, decode))[
        "spec"
    ]["template"]["spec"]
    engine, worker = pod["containers"]
    assert worker["name"] == render.ATTENTION_CONTAINER
    engine_args, worker_args = parsed(engine["args"]), parsed(worker["args"])
    assert worker_args["role"] == "attention"
    assert engine_args["attention_service"] == f"127.0.0.1:{worker_args['kv_port']}"
    ports = [p["containerPort"] for c in pod["containers"] for p in c["ports"]]
    assert len(set(ports)) == len(ports)  # one network namespace: no port taken twice
    assert {worker_args["port"], worker_args["kv_port"]} <= set(ports)
    assert engine_args["port"] not in (worker_args["port"], worker_args["kv_port"])
    assert worker["resources"]["requests"] == {"cpu": "1"}
