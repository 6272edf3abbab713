"""Rendering, status, inventory and pruning of the operator: no API server.

Every rendered object is validated against the Kubernetes OpenAPI schemas (kubernetes-validate,
strict: unknown fields fail) and every status against the generated ModelDeployment CRD schema.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
from api_samples import chat_deployment, example_classes, plan_for, spec_of
from pydantic import ValidationError
from tessera.api.crdgen import build_crds
from tessera.api.model_deployment import (
    ModelDeploymentSpec,
    Plan,
    PoolPlan,
    PoolRole,
    ServingMode,
)
from tessera.operator import inventory, render
from tessera.operator.apply import NameConflictError, apply_children, foreign_holder
from tessera.operator.reconcile import (
    classes_fingerprint,
    describe_spec_error,
    is_dry_run,
    plan_summary,
)
from tessera.operator.status import (
    DEGRADED,
    PROGRESSING,
    READY,
    Outcome,
    Rollout,
    build_status,
    comparable,
    merge_conditions,
    refreshed_readiness,
)

KUBERNETES_VERSION = kubernetes_validate.utils.latest_version()
OWNER = render.Owner(name="chat", namespace="serving", uid="3f6b8f0e-0000-4000-8000-000000000001")
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def validate_kubernetes(obj: dict[str, Any]) -> None:
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        raise AssertionError(
            f"{obj['kind']}/{obj['metadata']['name']}: {error.message} at {list(error.path)}"
        ) from None


def status_schema() -> dict[str, Any]:
    for crd in build_crds():
        if crd["spec"]["names"]["kind"] == "ModelDeployment":
            schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
            return schema["properties"]["status"]
    raise KeyError("ModelDeployment")


DISAGGREGATED = spec_of(servingMode="disaggregated")
COLOCATED = spec_of(servingMode="colocated")


@pytest.mark.parametrize("spec", [DISAGGREGATED, COLOCATED], ids=["disaggregated", "colocated"])
def test_one_deployment_per_pool_and_valid_kubernetes_objects(spec: ModelDeploymentSpec) -> None:
    plan = plan_for(spec)
    children = render.render_children(OWNER, spec, plan, example_classes())
    for child in children:
        validate_kubernetes(child)
    deployments = [
        c
        for c in children
        if c["kind"] == "Deployment"
        and c["metadata"]["labels"]["app.kubernetes.io/name"] == "tessera-engine"
    ]
    assert [d["metadata"]["name"] for d in deployments] == [
        f"chat-{pool.name}" for pool in plan.pools
    ]
    for deployment, pool in zip(deployments, plan.pools, strict=True):
        labels = deployment["metadata"]["labels"]
        assert labels == {
            "app.kubernetes.io/name": "tessera-engine",
            "app.kubernetes.io/managed-by": "tessera",
            "tessera.dev/deployment": "chat",
            "tessera.dev/pool": pool.name,
            "tessera.dev/role": pool.role.value,
            "tessera.dev/accelerator-class": pool.accelerator_class,
        }
        assert deployment["spec"]["replicas"] == pool.replicas
        selector = deployment["spec"]["selector"]["matchLabels"]
        template_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= template_labels.items()
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert f"--role={pool.role.value}" in container["args"]
        assert f"--tensor-parallel-size={pool.tensor_parallel}" in container["args"]
        assert f"--model={spec.model.name}" in container["args"]
        assert container["image"] == spec.engine.container_image
        assert container["ports"][0]["containerPort"] == spec.engine.port
        gpus = str(pool.tensor_parallel)
        assert container["resources"] == {
            "requests": {"nvidia.com/gpu": gpus},
            "limits": {"nvidia.com/gpu": gpus},
        }
    for child in children:
        assert child["metadata"]["ownerReferences"] == [
            {
                "apiVersion": "tessera.dev/v1alpha1",
                "kind": "ModelDeployment",
                "name": "chat",
                "uid": OWNER.uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert child["metadata"]["namespace"] == "serving"


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def test_entry_service_selects_the_router_or_the_colocated_pools() -> None:
    for spec, entry in ((DISAGGREGATED, "router"), (COLOCATED, "colocated")):
        plan = plan_for(spec)
        children = render.render_children(OWNER, spec, plan, example_classes())
        services = [c for c in children if c["kind"] == "Service"]
        assert services[0]["metadata"]["name"] == "chat"
        assert services[0]["spec"]["selector"] == {
            "tessera.dev/deployment": "chat",
            "tessera.dev/role": entry,
        }
        assert services[0]["spec"]["ports"][0]["port"] == spec.engine.port
        assert "clusterIP" not in services[0]["spec"]
        templates = [
            (c["metadata"]["name"], c["spec"]["template"]["metadata"]["labels"])
            for c in children
            if c["kind"] == "Deployment"
        ]
        selected = [
            name for name, labels in templates if selects(services[0]["spec"]["selector"], labels)
        ]
        expected = ["chat-router"] if entry == "router" else [f"chat-{p.name}" for p in plan.pools]
        assert selected == expected
    disaggregated = render.render_services(OWNER, DISAGGREGATED, plan_for(DISAGGREGATED))
    assert [s["metadata"]["name"] for s in disaggregated] == ["chat", "chat-prefill", "chat-decode"]
    for service, role in zip(disaggregated[1:], ("prefill", "decode"), strict=True):
        assert service["spec"]["clusterIP"] == "None"
        assert service["spec"]["selector"]["tessera.dev/role"] == role
    colocated = render.render_services(OWNER, COLOCATED, plan_for(COLOCATED))
    assert [s["metadata"]["name"] for s in colocated] == ["chat"]


def test_a_disaggregated_plan_is_fronted_by_the_router_over_the_headless_services() -> None:
    plan = plan_for(DISAGGREGATED)
    children = render.render_children(OWNER, DISAGGREGATED, plan, example_classes())
    (router,) = [c for c in children if c["metadata"]["name"] == "chat-router"]
    assert router["kind"] == "Deployment"
    assert router["spec"]["replicas"] == render.ROUTER_REPLICAS >= 2
    pod = router["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["tessera", "router"]
    assert container["args"] == [
        "--prefill-service=http://chat-prefill.serving.svc:8000",
        "--decode-service=http://chat-decode.serving.svc:8000",
        "--port=8000",
    ]
    assert "limits" not in container["resources"] or "cpu" not in container["resources"]["limits"]
    assert not any("nvidia.com/gpu" in str(v) for v in container["resources"].values())
    assert "affinity" not in pod, "the router needs no accelerator node"
    engine_pods = [
        c["spec"]["template"]["metadata"]["labels"]
        for c in children
        if c["kind"] == "Deployment" and c is not router
    ]
    assert not any(selects(router["spec"]["selector"]["matchLabels"], p) for p in engine_pods)
    services = {c["metadata"]["name"]: c for c in children if c["kind"] == "Service"}
    for name, role in (("chat-prefill", "prefill"), ("chat-decode", "decode")):
        chosen = [p for p in engine_pods if selects(services[name]["spec"]["selector"], p)]
        assert chosen and all(p["tessera.dev/role"] == role for p in chosen)
    colocated = render.render_children(OWNER, COLOCATED, plan_for(COLOCATED), example_classes())
    assert not any(c["metadata"]["name"] == "chat-router" for c in colocated)


def engine_args_by_role(spec: ModelDeploymentSpec, plan: Plan) -> dict[str, list[str]]:
    """The engine container's arguments of each pool, by role."""
    args: dict[str, list[str]] = {}
    for child in render.render_children(OWNER, spec, plan, example_classes()):
        if child["kind"] == "Deployment":
            container = child["spec"]["template"]["spec"]["containers"][0]
            args[child["metadata"]["labels"]["tessera.dev/role"]] = container["args"]
    return args


def test_decode_replicas_are_told_where_prefill_is() -> None:
    by_role = engine_args_by_role(DISAGGREGATED, plan_for(DISAGGREGATED))
    assert "--prefill-service=chat-prefill.serving.svc:8000" in by_role["decode"]
    assert not any(a.startswith("--prefill-service") for a in by_role["prefill"])


def test_engines_get_the_scheduler_their_plan_was_scored_with() -> None:
    plan = plan_for(COLOCATED)
    longest = COLOCATED.model.architecture.max_context_tokens
    for chunk, expected in (
        (512, ["--max-num-batched-tokens=512", "--enable-chunked-prefill"]),
        (None, [f"--max-num-batched-tokens={longest}", "--no-enable-chunked-prefill"]),
    ):
        pool = plan.pools[0].model_copy(update={"prefill_chunk_tokens": chunk})
        scheduled = plan.model_copy(update={"pools": [pool]})
        args = engine_args_by_role(COLOCATED, scheduled)["colocated"]
        assert args[-3:] == ["--max-num-seqs=256", *expected]
    offload = spec_of(servingMode="attention-offload")
    plan = plan_for(offload)
    by_role = engine_args_by_role(offload, plan)
    for pool in plan.pools:
        args = by_role[pool.role.value]
        if pool.role is PoolRole.ATTENTION:
            assert not any("num-seqs" in a or "chunked" in a for a in args)
            continue
        assert f"--max-num-seqs={pool.max_running_requests}" in args
        assert "--no-enable-chunked-prefill" in args
    decode = next(p for p in plan.pools if p.role is PoolRole.DECODE)
    assert decode.max_running_requests == 2048


def test_extra_args_come_last_so_they_override_the_rendered_flags() -> None:
    extra = ["--max-num-seqs=64", "--max-num-batched-tokens=2048"]
    spec = COLOCATED.model_copy(
        update={"engine": COLOCATED.engine.model_copy(update={"extra_args": extra})}
    )
    args = engine_args_by_role(spec, plan_for(spec))["colocated"]
    assert args[-2:] == extra
    assert args.index("--max-num-seqs=256") < args.index("--max-num-seqs=64")


def test_class_placement_affinity_tolerations_and_priority() -> None:
    spec = spec_of(servingMode="colocated", priorityClassName="inference-high")
    plan = plan_for(spec)
    pool = plan.pools[0]
    class_spec = example_classes()[pool.accelerator_class].model_copy(
        update={
            "node_selector": {"tessera.dev/accelerator": "x", "zone": "a"},
            "tolerations": [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            ],
        }
    )
    deployment = render.render_deployment(OWNER, spec, plan, pool, class_spec)
    validate_kubernetes(deployment)
    pod = deployment["spec"]["template"]["spec"]
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms["nodeSelectorTerms"] == [
        {
            "matchExpressions": [
                {"key": "tessera.dev/accelerator", "operator": "In", "values": ["x"]},
                {"key": "zone", "operator": "In", "values": ["a"]},
            ]
        }
    ]
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert pod["priorityClassName"] == "inference-high"
    bare = render.render_deployment(
        OWNER,
        spec,
        plan,
        pool,
        class_spec.model_copy(update={"node_selector": {}, "tolerations": []}),
    )
    assert "affinity" not in bare["spec"]["template"]["spec"]
    assert "tolerations" not in bare["spec"]["template"]["spec"]


def test_npu_and_cpu_classes_request_their_own_resources() -> None:
    spec = spec_of(servingMode="colocated")
    npu = example_classes()["ascend910b"]
    cpu = example_classes()["cpu-spr"]
    pool = PoolPlan(
        name="colocated-x",
        role=PoolRole.COLOCATED,
        accelerator_class="x",
        tensor_parallel=2,
        replicas=1,
    )
    plan = Plan(mode=ServingMode.COLOCATED, pools=[pool], cost_per_hour=1, power_w=1, rationale="r")
    npu_resources = render.render_deployment(OWNER, spec, plan, pool, npu)["spec"]["template"][
        "spec"
    ]["containers"][0]["resources"]
    assert npu_resources == {
        "requests": {"huawei.com/Ascend910": "2"},
        "limits": {"huawei.com/Ascend910": "2"},
    }
    cpu_deployment = render.render_deployment(OWNER, spec, plan, pool, cpu)
    validate_kubernetes(cpu_deployment)
    resources = cpu_deployment["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources == {"requests": {"cpu": "2"}}


def test_same_inputs_render_identical_objects_and_the_hash_tracks_content() -> None:
    plan = plan_for(DISAGGREGATED)
    first = render.render_children(OWNER, DISAGGREGATED, plan, example_classes())
    second = render.render_children(OWNER, DISAGGREGATED, copy.deepcopy(plan), example_classes())
    assert first == second
    hashes = [c["metadata"]["annotations"][render.CONFIG_HASH_ANNOTATION] for c in first]
    assert len(set(hashes)) == len(hashes)
    scaled = plan.model_copy(deep=True)
    scaled.pools[0].replicas += 1
    changed = render.render_children(OWNER, DISAGGREGATED, scaled, example_classes())
    assert (
        changed[0]["metadata"]["annotations"][render.CONFIG_HASH_ANNOTATION]
        != first[0]["metadata"]["annotations"][render.CONFIG_HASH_ANNOTATION]
    )
    assert changed[1] == first[1]


def test_long_and_dotted_names_become_valid_kubernetes_names() -> None:
    owner = render.Owner(name="a." + "very-long-name-" * 10 + "x", namespace="ns", uid="u")
    plan = plan_for(DISAGGREGATED)
    children = render.render_children(owner, DISAGGREGATED, plan, example_classes())
    names = [c["metadata"]["name"] for c in children]
    assert len(set(names)) == len(names)
    for child in children:
        validate_kubernetes(child)
        assert len(child["metadata"]["name"]) <= 63
        for value in child["metadata"]["labels"].values():
            assert len(value) <= 63
    assert render.dns_label("chat") == "chat"
    assert render.dns_label("9lives") != render.dns_label("t-9lives")


def test_a_plan_on_an_unknown_class_is_an_error_naming_it() -> None:
    plan = plan_for(COLOCATED)
    with pytest.raises(render.UnknownAcceleratorClassError, match=plan.pools[0].accelerator_class):
        render.render_children(OWNER, COLOCATED, plan, {})


# --- status -----------------------------------------------------------------------------------


def deployment_status(
    replicas: int, ready: int, generation: int = 1, observed: int = 1
) -> dict[str, Any]:
    return {
        "kind": "Deployment",
        "metadata": {"generation": generation},
        "spec": {"replicas": replicas},
        "status": {
            "observedGeneration": observed,
            "readyReplicas": ready,
            "updatedReplicas": replicas,
        },
    }


def conditions_by_type(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status["conditions"]}


def test_rollout_counts_ready_replicas_and_stale_generations() -> None:
    rollout = Rollout.of_workloads([deployment_status(2, 2), deployment_status(3, 1)])
    assert (rollout.desired_replicas, rollout.ready_replicas) == (5, 3)
    assert not rollout.complete
    assert Rollout.of_workloads([deployment_status(2, 2), deployment_status(1, 1)]).complete
    stale = Rollout.of_workloads([deployment_status(2, 2, generation=3, observed=2)])
    assert stale.ready_replicas == 2 and not stale.complete
    assert (
        Rollout.of_workloads([{"kind": "Deployment", "spec": {"replicas": 1}}]).ready_replicas == 0
    )


def test_applied_plan_progresses_until_ready() -> None:
    plan = plan_for(DISAGGREGATED)
    common = {"outcome": Outcome.APPLIED, "message": plan.rationale, "plan": plan}
    rolling = build_status(
        None, generation=1, rollout=Rollout(2, 0, False), endpoint="http://e", now=NOW, **common
    )
    conditions = conditions_by_type(rolling)
    assert conditions[READY]["status"] == "False"
    assert conditions[PROGRESSING]["status"] == "True"
    assert conditions[DEGRADED]["status"] == "False"
    assert all(c["observedGeneration"] == 1 for c in conditions.values())
    assert rolling["plan"] == plan.to_wire()
    assert rolling["observedGeneration"] == 1
    later = NOW + timedelta(minutes=5)
    ready = build_status(
        rolling, generation=1, rollout=Rollout(2, 2, True), endpoint="http://e", now=later, **common
    )
    after = conditions_by_type(ready)
    assert after[READY]["status"] == "True"
    assert after[READY]["lastTransitionTime"] == "2026-01-02T03:09:05Z"
    assert after[PROGRESSING]["status"] == "False"
    assert after[DEGRADED]["lastTransitionTime"] == conditions[DEGRADED]["lastTransitionTime"]
    assert ready["readyReplicas"] == 2
    jsonschema.Draft4Validator(status_schema()).validate(comparable(ready))


def test_infeasible_without_and_with_a_plan_in_force() -> None:
    fresh = build_status(
        None,
        generation=1,
        outcome=Outcome.INFEASIBLE,
        message="no feasible plan: l40s: model needs 800 GiB",
        plan=None,
        rollout=None,
        endpoint=None,
        now=NOW,
    )
    conditions = conditions_by_type(fresh)
    assert conditions[DEGRADED] | {"lastTransitionTime": None} == {
        "type": DEGRADED,
        "status": "True",
        "reason": "Infeasible",
        "message": "no feasible plan: l40s: model needs 800 GiB",
        "lastTransitionTime": None,
        "observedGeneration": 1,
    }
    assert conditions[READY]["status"] == "False"
    assert conditions[READY]["reason"] == "Infeasible"
    assert fresh["plan"] is None
    jsonschema.Draft4Validator(status_schema()).validate(comparable(fresh))
    plan = plan_for(COLOCATED)
    kept = build_status(
        fresh,
        generation=2,
        outcome=Outcome.INFEASIBLE,
        message="no feasible plan",
        plan=plan,
        rollout=Rollout(1, 1, True),
        endpoint="http://e",
        now=NOW,
    )
    conditions = conditions_by_type(kept)
    assert conditions[READY]["status"] == "True"
    assert conditions[PROGRESSING]["status"] == "False"
    assert conditions[PROGRESSING]["reason"] == "Infeasible"
    assert kept["plan"] == plan.to_wire()


def test_merge_keeps_transition_time_only_while_status_holds() -> None:
    previous = [
        {"type": READY, "status": "False", "lastTransitionTime": "2020-01-01T00:00:00Z"},
        {"type": DEGRADED, "status": "False", "lastTransitionTime": "2020-01-01T00:00:00Z"},
    ]
    status = build_status(
        {"conditions": previous},
        generation=1,
        outcome=Outcome.INVALID_SPEC,
        message="spec.slo.ttftMs: Input should be greater than 0",
        plan=None,
        rollout=None,
        endpoint=None,
        now=NOW,
    )
    merged = conditions_by_type(status)
    assert merged[READY]["lastTransitionTime"] == "2020-01-01T00:00:00Z"
    assert merged[DEGRADED]["lastTransitionTime"] == "2026-01-02T03:04:05Z"
    assert merged[PROGRESSING]["lastTransitionTime"] == "2026-01-02T03:04:05Z"
    assert merge_conditions(status["conditions"], [], NOW) == []


def test_readiness_refresh_changes_only_readiness_and_only_when_needed() -> None:
    plan = plan_for(COLOCATED)
    status = build_status(
        None,
        generation=4,
        outcome=Outcome.APPLIED,
        message="m",
        plan=plan,
        rollout=Rollout(2, 0, False),
        endpoint="http://e",
        now=NOW,
    )
    patch = refreshed_readiness(status, Rollout(2, 2, True), NOW)
    assert patch is not None
    assert set(patch) == {"conditions", "readyReplicas"}
    assert conditions_by_type(patch)[READY]["status"] == "True"
    assert all(c["observedGeneration"] == 4 for c in patch["conditions"])
    assert refreshed_readiness({**status, **patch}, Rollout(2, 2, True), NOW) is None
    assert refreshed_readiness(None, Rollout(2, 2, True), NOW) is None
    dry = build_status(
        None,
        generation=1,
        outcome=Outcome.DRY_RUN,
        message="m",
        plan=plan,
        rollout=None,
        endpoint=None,
        now=NOW,
    )
    assert refreshed_readiness(dry, Rollout(2, 2, True), NOW) is None


# --- inventory --------------------------------------------------------------------------------


def node(labels: dict[str, str], allocatable: dict[str, str], **extra: Any) -> dict[str, Any]:
    return {"metadata": {"labels": labels}, "status": {"allocatable": allocatable}, **extra}


def test_class_capacity_counts_schedulable_ready_matching_nodes() -> None:
    h100 = example_classes()["h100"]
    selected = {"tessera.dev/accelerator": "h100"}
    nodes = [
        node(selected, {"nvidia.com/gpu": "8"}),
        node(selected, {"nvidia.com/gpu": "4"}),
        node(selected, {"nvidia.com/gpu": "8"}, spec={"unschedulable": True}),
        node(
            selected,
            {"nvidia.com/gpu": "8"},
            status={
                "allocatable": {"nvidia.com/gpu": "8"},
                "conditions": [{"type": "Ready", "status": "False"}],
            },
        ),
        node({"tessera.dev/accelerator": "a100"}, {"nvidia.com/gpu": "8"}),
    ]
    assert inventory.class_capacity(h100, nodes) == 12
    assert inventory.class_capacity(h100, nodes[4:]) is None
    cpu = example_classes()["cpu-spr"]
    cpu_nodes = [node({"tessera.dev/accelerator": "cpu-spr"}, {"cpu": "223500m"})] * 3
    assert inventory.class_capacity(cpu, cpu_nodes) == 3 * cpu.accelerators_per_node
    assert inventory.node_selector_query(h100) == "tessera.dev/accelerator=h100"


def test_offers_subtract_what_other_plans_hold() -> None:
    all_classes = example_classes()
    other = plan_for(DISAGGREGATED)
    held = inventory.held_by_plans([other, other])
    offers = inventory.build_offers(
        all_classes, {name: 3 for name in all_classes} | {"h100": None}, [other, other]
    )
    assert [o.name for o in offers] == sorted(all_classes)
    for offer in offers:
        if offer.name == "h100":
            assert offer.free_accelerators is None
        else:
            assert offer.free_accelerators == max(0, 3 - held.get(offer.name, 0))
    assert sum(held.values()) == 2 * other.accelerators


# --- reconcile helpers ------------------------------------------------------------------------


def test_spec_errors_name_the_yaml_fields() -> None:
    document = chat_deployment()
    document["spec"]["traffic"]["requestRatePerSecond"] = -1
    document["spec"]["slo"]["ttftMz"] = 3
    with pytest.raises(ValidationError) as caught:
        ModelDeploymentSpec.model_validate(document["spec"])
    message = describe_spec_error(caught.value)
    assert "spec.traffic.requestRatePerSecond: Input should be greater than 0" in message
    assert "spec.slo.ttftMz" in message


def test_dry_run_annotation_and_fingerprints() -> None:
    assert is_dry_run({"annotations": {"tessera.dev/dry-run": "true"}})
    assert is_dry_run({"annotations": {"tessera.dev/dry-run": "True"}})
    assert not is_dry_run({"annotations": {"tessera.dev/dry-run": "false"}})
    assert not is_dry_run({})
    specs: dict[str, Any] = {"a": {"costPerHour": 1}, "b": {"costPerHour": 2}}
    base = classes_fingerprint(["a"], specs)
    assert base == classes_fingerprint(["a"], copy.deepcopy(specs))
    assert base == classes_fingerprint(["a"], {**specs, "b": {"costPerHour": 3}})
    assert base != classes_fingerprint(["a"], {**specs, "a": {"costPerHour": 3}})
    assert classes_fingerprint([], specs) != classes_fingerprint([], {"a": specs["a"]})
    assert base != classes_fingerprint(["a"], {"b": specs["b"]})
    summary = plan_summary(plan_for(COLOCATED))
    assert summary.startswith("colocated: colocated-")


# --- apply: what is pruned ------------------------------------------------------------------


class RecordingApplier:
    """A stand-in for ChildApplier over an in-memory namespace (no API server)."""

    def __init__(self, existing: list[dict[str, Any]]) -> None:
        self.objects = {(o["kind"], o["metadata"]["name"]): o for o in existing}
        self.deleted: list[str] = []

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.objects[obj["kind"], obj["metadata"]["name"]] = obj
        return obj

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self.objects.get((kind, name))

    def list_children(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        wanted = dict(term.split("=", 1) for term in selector.split(","))
        return [
            o
            for o in self.objects.values()
            if wanted.items() <= (o["metadata"].get("labels") or {}).items()
        ]

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        self.deleted.append(f"{kind}/{name}")
        return self.objects.pop((kind, name), None) is not None


def test_apply_prunes_only_this_deployments_managed_children() -> None:
    colocated = render.render_children(OWNER, COLOCATED, plan_for(COLOCATED), example_classes())
    split = render.render_children(OWNER, DISAGGREGATED, plan_for(DISAGGREGATED), example_classes())
    other_owner = render.Owner(name="other", namespace="serving", uid="u2")
    others = render.render_children(other_owner, COLOCATED, plan_for(COLOCATED), example_classes())
    hand_made = copy.deepcopy(colocated[0])
    hand_made["metadata"]["name"] = "hand-made"
    del hand_made["metadata"]["labels"][render.MANAGED_BY_LABEL]
    applier = RecordingApplier([*colocated, *others, hand_made])
    result = apply_children(applier, OWNER, split)  # type: ignore[arg-type]
    assert result.applied == split
    expected = {f"{c['kind']}/{c['metadata']['name']}" for c in colocated} - {
        f"{c['kind']}/{c['metadata']['name']}" for c in split
    }
    assert set(result.pruned) == expected == set(applier.deleted)
    remaining = {(kind, name) for kind, name in applier.objects}
    assert ("Deployment", "hand-made") in remaining
    assert all((c["kind"], c["metadata"]["name"]) in remaining for c in others)


# --- apply: names another owner holds ---------------------------------------------------------

MD_X = render.Owner(name="x", namespace="serving", uid="uid-x")
MD_X_PREFILL = render.Owner(name="x-prefill", namespace="serving", uid="uid-x-prefill")


def children_of(owner: render.Owner, spec: ModelDeploymentSpec) -> list[dict[str, Any]]:
    return render.render_children(owner, spec, plan_for(spec), example_classes())


def test_x_and_x_prefill_want_the_same_service() -> None:
    """The collision of issue 11: the prefill Service of `x` is the entry Service of `x-prefill`."""
    names_x = {(c["kind"], c["metadata"]["name"]) for c in children_of(MD_X, DISAGGREGATED)}
    names_other = {(c["kind"], c["metadata"]["name"]) for c in children_of(MD_X_PREFILL, COLOCATED)}
    assert names_x & names_other == {("Service", "x-prefill")}


@pytest.mark.parametrize(
    ("first", "first_spec", "second", "second_spec"),
    [
        pytest.param(MD_X, DISAGGREGATED, MD_X_PREFILL, COLOCATED, id="x-first"),
        pytest.param(MD_X_PREFILL, COLOCATED, MD_X, DISAGGREGATED, id="x-prefill-first"),
    ],
)
def test_a_name_another_deployment_holds_is_refused_and_nothing_is_applied(
    first: render.Owner,
    first_spec: ModelDeploymentSpec,
    second: render.Owner,
    second_spec: ModelDeploymentSpec,
) -> None:
    applier = RecordingApplier([])
    apply_children(applier, first, children_of(first, first_spec))  # type: ignore[arg-type]
    before = copy.deepcopy(applier.objects)
    with pytest.raises(NameConflictError) as raised:
        apply_children(applier, second, children_of(second, second_spec))  # type: ignore[arg-type]
    assert applier.objects == before, "a refused apply must change nothing"
    assert raised.value.conflicts == [
        ("Service/x-prefill", f"belongs to ModelDeployment {first.name}")
    ]
    message = str(raised.value)
    assert f"ModelDeployment {second.name} " in message
    assert f"belongs to ModelDeployment {first.name} " in message
    # The holder keeps applying its own children, again and again.
    again = apply_children(applier, first, children_of(first, first_spec))  # type: ignore[arg-type]
    assert again.pruned == []
    held = applier.objects["Service", "x-prefill"]["metadata"]["ownerReferences"][0]
    assert held["uid"] == first.uid


def _existing(
    controller: dict[str, Any] | None = None, labels: dict[str, str] | None = None
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "x-prefill", "labels": labels or {}}
    if controller is not None:
        meta["ownerReferences"] = [{"controller": True, **controller}]
    return {"kind": "Service", "metadata": meta}


OURS = {render.MANAGED_BY_LABEL: render.MANAGED_BY, render.DEPLOYMENT_LABEL: "x"}
MD_REF = {"apiVersion": "tessera.dev/v1alpha1", "kind": "ModelDeployment"}


@pytest.mark.parametrize(
    ("existing", "holder"),
    [
        pytest.param(_existing({**MD_REF, "name": "x", "uid": "uid-x"}, OURS), None, id="ours"),
        pytest.param(
            _existing({**MD_REF, "name": "x", "uid": "uid-of-a-deleted-x"}, OURS),
            None,
            id="an-earlier-x",
        ),
        pytest.param(_existing(None, OURS), None, id="orphaned-ours"),
        pytest.param(
            _existing({**MD_REF, "name": "x-prefill", "uid": "u2"}),
            "belongs to ModelDeployment x-prefill",
            id="another-deployment",
        ),
        pytest.param(
            _existing({"apiVersion": "example.com/v1", "kind": "ModelDeployment", "name": "x"}),
            "belongs to ModelDeployment x (example.com/v1)",
            id="another-group-kind",
        ),
        pytest.param(
            _existing({"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "r", "uid": "u3"}),
            "belongs to ReplicaSet r (apps/v1)",
            id="another-controller",
        ),
        pytest.param(_existing(), "exists and is not managed by Tessera", id="hand-made"),
        pytest.param(
            _existing(None, {**OURS, render.DEPLOYMENT_LABEL: "x-prefill"}),
            "belongs to ModelDeployment x-prefill (orphaned)",
            id="orphaned-other",
        ),
    ],
)
def test_who_holds_an_existing_object(existing: dict[str, Any], holder: str | None) -> None:
    assert foreign_holder(existing, MD_X) == holder
