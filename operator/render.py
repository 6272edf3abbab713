"""From a ModelDeployment and its plan to the Kubernetes objects that run it (pure).

One apps/v1 Deployment per pool, named `<md>-<pool>`, and Services:

- `<md>`: the entry point clients call. In a colocated plan it selects the colocated pools. In a
  disaggregated plan (prefill pools and decode pools) it selects the pods of the Deployment
  `<md>-router`, which runs `tessera router`: the router picks a prefill and a decode pod with
  `policies.dispatch` on their live load and sends the request to the decode pod, which pulls the
  prompt's KV cache from the prefill pod and streams the tokens (the llm-d pattern: the token
  stream never passes through prefill).
- `<md>-prefill` and `<md>-decode` (headless, disaggregated plans only): one DNS name per role
  that resolves to the ready pods' IPs. The router re-resolves both every probe interval, so a
  pod added by a scale-up is found without a restart; decode pods name `<md>-prefill` as their
  default prefill instance. They disappear when the plan stops being disaggregated.

- `<md>-colocated` (headless, colocated plans with `autoscaling.enabled`): the migration peers
  a draining colocated pod finds by DNS. Every colocated and decode pod of `tessera serve` has a
  preStop hook, `tessera drain`, that migrates its running requests to its peers before the pod
  goes (scale-down, rollout), with a grace period above the drain deadline.
- `<md>-<attention pool>` (headless, attention-offload plans): the workers of an attention pool
  (`tessera serve --role attention`, holding the KV and running the attention of the decode
  pool the plan's `attentionFor` names); its decode pods get `--attention-service` and each
  claims an idle worker. A host-memory attention pool (policies/host_memory.py) has neither
  pods nor Service of its own: host DRAM is reachable only from its host, so its worker is a
  container of every decode pod, reached on 127.0.0.1.

Every object carries an owner reference to the ModelDeployment (so Kubernetes' garbage collector
removes it with its owner), the Tessera labels, and a hash of its own content: the same inputs
always render byte-identical objects, so re-applying an unchanged plan is a no-op.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tessera.api.accelerator_class import AcceleratorClassSpec
from tessera.api.common import API_VERSION
from tessera.api.model_deployment import (
    EngineKind,
    ModelDeploymentSpec,
    Plan,
    PoolPlan,
    PoolRole,
)
from tessera.policies.host_memory import is_host_memory

MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "tessera"
NAME_LABEL = "app.kubernetes.io/name"
ENGINE_NAME = "tessera-engine"
DEPLOYMENT_LABEL = "tessera.dev/deployment"
POOL_LABEL = "tessera.dev/pool"
ROLE_LABEL = "tessera.dev/role"
CLASS_LABEL = "tessera.dev/accelerator-class"
CONFIG_HASH_ANNOTATION = "tessera.dev/config-hash"
ENGINE_CONTAINER = "engine"
PORT_NAME = "http"
HEALTH_PATH = "/health"
READY_PATH = "/ready"
ENGINE_COMMAND = ("tessera", "serve")
"""The image's entry point (Dockerfile) and subcommand; `engine_args` are `tessera serve` flags."""
VLLM_COMMAND = ("vllm", "serve")
"""`engine.kind: vllm`: vLLM's server in its own image; `vllm_args` are its documented flags."""
VLLM_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp8": "auto"}
VLLM_STARTUP_FAILURES = 60
"""vLLM listens only once its weights are loaded and its graphs captured: a startup probe
(10 s apart) gives it ten minutes before liveness checks begin."""
ROUTER_NAME = "tessera-router"
ROUTER_ROLE = "router"
"""The role label of the router's pods (no pool: the router is no PoolRole of the plan)."""
ROUTER_CONTAINER = "router"
ROUTER_COMMAND = ("tessera", "router")
"""The same image's router subcommand; `router_args` are `tessera router` flags."""
ROUTER_REPLICAS = 2
"""Two, so that the ModelDeployment's endpoint survives one router pod's restart or eviction;
each replica probes every engine pod itself, so they need no shared state."""
ROUTER_RESOURCES = {"requests": {"cpu": "500m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}}
"""An aiohttp proxy: little CPU, no accelerator; no CPU limit (throttling would add latency to
every token it relays)."""

ATTENTION_PORT_NAME = "attention"
"""An attention pool's session port (decode replicas connect to it; `--kv-port`)."""
ATTENTION_CONTAINER = "attention"
"""A host-memory attention worker's container, beside the engine in each decode pod."""
ATTENTION_PROBE_PORT_NAME = "attention-http"
SIDECAR_PROBE_OFFSET, SIDECAR_SESSION_OFFSET = 2, 3
"""A sidecar worker's probe and session ports, `engine.port` + these: the pod's network
namespace is shared with the engine, which holds `engine.port` (and a prefill or migration
port), so the sidecar takes its own."""

DRAIN_COMMAND = ("tessera", "drain")
"""The preStop hook's command (agents/serving/drain_hook.py), in the same image."""
DRAIN_GRACE_MARGIN_S = 15
"""terminationGracePeriodSeconds beyond the drain deadline: the drain call's own timeout, the
server's shutdown after it, and the kubelet's SIGTERM after the hook."""
POD_IP_ENV = "POD_IP"
"""The pod's own IP (downward API): a drain leaves it out of its peers."""

_DNS_LABEL_MAX = 63


@dataclass(frozen=True)
class Owner:
    """The ModelDeployment that owns the rendered children."""

    name: str
    namespace: str
    uid: str

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": "ModelDeployment",
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def _short_hash(text: str, length: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def dns_label(text: str) -> str:
    """A valid DNS-1035 label (Service names): lowercase, [-a-z0-9], starts with a letter, <= 63.

    Names that had to be changed get a hash of the original, so two different inputs never
    collapse onto the same label.
    """
    label = re.sub(r"[^a-z0-9-]", "-", text.lower()).strip("-")
    if not label or not label[0].isalpha():
        label = f"t-{label}".rstrip("-")
    if label == text and len(label) <= _DNS_LABEL_MAX:
        return label
    suffix = _short_hash(text)
    return f"{label[: _DNS_LABEL_MAX - len(suffix) - 1].rstrip('-')}-{suffix}"


def label_value(text: str) -> str:
    """A valid label value (<= 63 chars, alphanumeric at both ends); hashed when shortened."""
    value = re.sub(r"[^A-Za-z0-9_.-]", "-", text).strip("-_.")
    if value == text and len(value) <= _DNS_LABEL_MAX:
        return value
    suffix = _short_hash(text)
    return f"{value[: _DNS_LABEL_MAX - len(suffix) - 1].rstrip('-_.')}-{suffix}"


def workload_name(owner: Owner, pool: PoolPlan) -> str:
    """`<md>-<pool>`, as a DNS label (pod names and hostnames derive from it)."""
    return dns_label(f"{owner.name}-{pool.name}")


def service_name(owner: Owner) -> str:
    return dns_label(owner.name)


def prefill_service_name(owner: Owner) -> str:
    return dns_label(f"{owner.name}-prefill")


def decode_service_name(owner: Owner) -> str:
    return dns_label(f"{owner.name}-decode")


def router_name(owner: Owner) -> str:
    return dns_label(f"{owner.name}-router")


def is_disaggregated(plan: Plan) -> bool:
    """Prefill pools and pools that take their KV: the plans a router fronts."""
    roles = {pool.role for pool in plan.pools}
    return {PoolRole.PREFILL, PoolRole.DECODE} <= roles


def attention_service_name(owner: Owner, attention_pool: PoolPlan) -> str:
    """`<md>-<attention pool>`: the headless Service of an attention pool's workers."""
    return dns_label(f"{owner.name}-{attention_pool.name}")


def attention_port(spec: ModelDeploymentSpec) -> int:
    """Where attention workers take sessions: `tessera serve`'s --kv-port default."""
    return spec.engine.port + 1


def sidecar_session_port(spec: ModelDeploymentSpec) -> int:
    return spec.engine.port + SIDECAR_SESSION_OFFSET


def sidecar_attention_pool(
    plan: Plan, pool: PoolPlan, classes: Mapping[str, AcceleratorClassSpec]
) -> tuple[PoolPlan, AcceleratorClassSpec] | None:
    """The attention pool serving `pool` when its class is host memory: its worker must sit on
    the decode replica's own host, so it runs as a container of the decode pod (one worker per
    replica, reached on 127.0.0.1) rather than as pods of its own."""
    attention = plan.attention_pool_for(pool.name)
    if attention is None:
        return None
    class_spec = classes.get(attention.accelerator_class)
    if class_spec is None or not is_host_memory(class_spec):
        return None
    return attention, class_spec


def http_probes(
    port_name: str, *, ready_period_s: int = 5, liveness_failures: int = 6
) -> dict[str, Any]:
    """A `tessera` container's readiness probe on /ready and liveness probe on /health (every
    10 s), both on the named port: unready takes it out of its Service at once, while
    `liveness_failures` misses in a row restart it."""
    return {
        "readinessProbe": {
            "httpGet": {"path": READY_PATH, "port": port_name},
            "periodSeconds": ready_period_s,
        },
        "livenessProbe": {
            "httpGet": {"path": HEALTH_PATH, "port": port_name},
            "periodSeconds": 10,
            "failureThreshold": liveness_failures,
        },
    }


def owned_deployment(
    owner: Owner,
    name: str,
    labels: dict[str, str],
    selector: dict[str, str],
    replicas: int,
    pod_spec: dict[str, Any],
) -> dict[str, Any]:
    """An apps/v1 Deployment owned by the ModelDeployment, with its config hash: the one shape
    of every Deployment the operator renders (pools and router)."""
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": owner.namespace,
            "labels": labels,
            "ownerReferences": [owner.reference()],
        },
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector},
            "template": {"metadata": {"labels": dict(labels)}, "spec": pod_spec},
        },
    }
    return with_config_hash(deployment)


def attention_sidecar(
    owner: Owner,
    spec: ModelDeploymentSpec,
    plan: Plan,
    attention: PoolPlan,
    class_spec: AcceleratorClassSpec,
) -> dict[str, Any]:
    """The attention worker's container in a decode pod (`tessera serve --role attention`)."""
    probe_port = spec.engine.port + SIDECAR_PROBE_OFFSET
    return {
        "name": ATTENTION_CONTAINER,
        "image": spec.engine.container_image,
        "command": list(ENGINE_COMMAND),
        "args": engine_args(owner, spec, plan, attention, sidecar_attention=True),
        "ports": [
            {"name": ATTENTION_PROBE_PORT_NAME, "containerPort": probe_port, "protocol": "TCP"},
            {
                "name": ATTENTION_PORT_NAME,
                "containerPort": sidecar_session_port(spec),
                "protocol": "TCP",
            },
        ],
        "resources": resources_for(class_spec, attention.tensor_parallel),
        **http_probes(ATTENTION_PROBE_PORT_NAME),
    }


def endpoint_url(owner: Owner, spec: ModelDeploymentSpec) -> str:
    """In-cluster URL of the entry Service."""
    return f"http://{service_name(owner)}.{owner.namespace}.svc:{spec.engine.port}"


def entry_role(plan: Plan) -> PoolRole:
    """The role whose pools receive client requests (see the module docstring)."""
    roles = {pool.role for pool in plan.pools}
    for role in (PoolRole.COLOCATED, PoolRole.DECODE):
        if role in roles:
            return role
    return plan.pools[0].role


def entry_selector(owner: Owner, plan: Plan) -> dict[str, str]:
    """The labels of the pods that receive the deployment's client requests: the router's in a
    disaggregated plan, else the entry role's pools. The entry Service selects them, and so does
    the InferencePool (operator/inference_pool.py): one definition of the entry for both."""
    entry_pods = ROUTER_ROLE if is_disaggregated(plan) else entry_role(plan).value
    return {DEPLOYMENT_LABEL: label_value(owner.name), ROLE_LABEL: entry_pods}


def selector_labels(owner: Owner) -> dict[str, str]:
    """Labels that select every child of one ModelDeployment (used to list and prune)."""
    return {MANAGED_BY_LABEL: MANAGED_BY, DEPLOYMENT_LABEL: label_value(owner.name)}


def children_selector(owner: Owner) -> str:
    """The labelSelector query for `selector_labels`."""
    return ",".join(f"{key}={value}" for key, value in sorted(selector_labels(owner).items()))


def pool_labels(owner: Owner, pool: PoolPlan) -> dict[str, str]:
    return {
        NAME_LABEL: ENGINE_NAME,
        MANAGED_BY_LABEL: MANAGED_BY,
        DEPLOYMENT_LABEL: label_value(owner.name),
        POOL_LABEL: label_value(pool.name),
        ROLE_LABEL: pool.role.value,
        CLASS_LABEL: label_value(pool.accelerator_class),
    }


def with_config_hash(obj: dict[str, Any]) -> dict[str, Any]:
    """The object with an annotation hashing its own content (computed without the annotation)."""
    digest = _short_hash(json.dumps(obj, sort_keys=True, separators=(",", ":")), 16)
    obj["metadata"].setdefault("annotations", {})[CONFIG_HASH_ANNOTATION] = digest
    return obj


def engine_args(
    owner: Owner,
    spec: ModelDeploymentSpec,
    plan: Plan,
    pool: PoolPlan,
    *,
    sidecar_attention: bool = False,
) -> list[str]:
    """Arguments of the Tessera engine for one pool's replicas; `spec.engine.extraArgs` last,
    so that a user's own flag overrides one rendered here. `sidecar_attention`: the attention
    worker runs in the decode pod (a host-memory class): the decode engine reaches it on
    127.0.0.1, and the worker's own ports are the sidecar's."""
    sidecar_worker = sidecar_attention and pool.role is PoolRole.ATTENTION
    port = spec.engine.port + (SIDECAR_PROBE_OFFSET if sidecar_worker else 0)
    args = [
        f"--model={spec.model.name}",
        f"--role={pool.role.value}",
        f"--tensor-parallel-size={pool.tensor_parallel}",
        f"--port={port}",
        f"--dtype={spec.model.architecture.dtype.value}",
        f"--max-model-len={spec.model.architecture.max_context_tokens}",
        f"--served-model-name={owner.name}",
        f"--pool={pool.name}",
    ]
    if spec.model.weights_uri:
        args.append(f"--weights-uri={spec.model.weights_uri}")
    has_prefill = any(p.role is PoolRole.PREFILL for p in plan.pools)
    if pool.role is PoolRole.DECODE and has_prefill:
        args.append(
            f"--prefill-service={prefill_service_name(owner)}.{owner.namespace}.svc:"
            f"{spec.engine.port}"
        )
    attention = plan.attention_pool_for(pool.name)
    if attention is not None and sidecar_attention:
        args.append(f"--attention-service=127.0.0.1:{sidecar_session_port(spec)}")
    elif attention is not None:  # Lamina: this pool's KV and attention live on that pool
        args.append(
            f"--attention-service={attention_service_name(owner, attention)}.{owner.namespace}"
            f".svc:{attention_port(spec)}"
        )
    if pool.role is PoolRole.ATTENTION:
        session = sidecar_session_port(spec) if sidecar_worker else attention_port(spec)
        args.append(f"--kv-port={session}")
    return args + scheduler_args(spec, pool) + list(spec.engine.extra_args)


def scheduler_args(spec: ModelDeploymentSpec, pool: PoolPlan) -> list[str]:
    """The engine scheduler the plan was scored with (`PoolPlan.scheduler`, the same settings
    the simulator ran), as vLLM-compatible flags. Attention pools run no scheduler."""
    if pool.role is PoolRole.ATTENTION:
        return []
    return pool.scheduler(spec.model.architecture.max_context_tokens).engine_flags()


def vllm_model(spec: ModelDeploymentSpec) -> str:
    """`vllm serve`'s model argument: the local folder of a file:// URI, the repository of an
    hf:// one, any other weights URI as given, else the model's (Hugging Face) name."""
    uri = spec.model.weights_uri
    if not uri:
        return spec.model.name
    for scheme in ("file://", "hf://"):
        if uri.startswith(scheme):
            return uri.removeprefix(scheme)
    return uri


def vllm_args(owner: Owner, spec: ModelDeploymentSpec, pool: PoolPlan) -> list[str]:
    """`vllm serve` arguments for one colocated pool: the same plan as `engine_args` (parallelism,
    context, the scheduler the plan was scored with) in vLLM's documented flags, then
    `spec.engine.extraArgs`."""
    arch = spec.model.architecture
    args = [
        vllm_model(spec),
        f"--served-model-name={owner.name}",
        f"--port={spec.engine.port}",
        f"--tensor-parallel-size={pool.tensor_parallel}",
        f"--dtype={VLLM_DTYPES[arch.dtype.value]}",
        f"--max-model-len={arch.max_context_tokens}",
    ]
    if arch.dtype.value == "fp8":
        args.append("--quantization=fp8")
    return args + scheduler_args(spec, pool) + list(spec.engine.extra_args)


def as_vllm(
    container: dict[str, Any], owner: Owner, spec: ModelDeploymentSpec, pool: PoolPlan
) -> None:
    """Turn a rendered engine container into vLLM's: its command and flags, and probes on
    /health (vLLM has no /ready: it listens once it can serve), after a startup probe."""
    container["command"] = list(VLLM_COMMAND)
    container["args"] = vllm_args(owner, spec, pool)
    health = {"path": HEALTH_PATH, "port": PORT_NAME}
    container["readinessProbe"] = {"httpGet": dict(health), "periodSeconds": 5}
    container["startupProbe"] = {
        "httpGet": dict(health),
        "periodSeconds": 10,
        "failureThreshold": VLLM_STARTUP_FAILURES,
    }


def resources_for(class_spec: AcceleratorClassSpec, tensor_parallel: int) -> dict[str, Any]:
    """Requests/limits for one replica: `<resourceName>: TP`.

    Extended resources (GPUs, NPUs) must have equal requests and limits. A CPU class requests
    its CPUs without a limit: CFS throttling at a limit would stretch token latencies.
    """
    if class_spec.kind == "CPU" or class_spec.resource_name == "cpu":
        return {"requests": {class_spec.resource_name: str(tensor_parallel)}}
    quantity = {class_spec.resource_name: str(tensor_parallel)}
    return {"requests": dict(quantity), "limits": dict(quantity)}


def node_affinity(class_spec: AcceleratorClassSpec) -> dict[str, Any] | None:
    """Required node affinity equal to the class's node selector (None when it has none)."""
    if not class_spec.node_selector:
        return None
    expressions = [
        {"key": key, "operator": "In", "values": [value]}
        for key, value in sorted(class_spec.node_selector.items())
    ]
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": expressions}]
            }
        }
    }


def render_deployment(
    owner: Owner,
    spec: ModelDeploymentSpec,
    plan: Plan,
    pool: PoolPlan,
    class_spec: AcceleratorClassSpec,
    sidecar: tuple[PoolPlan, AcceleratorClassSpec] | None = None,
) -> dict[str, Any]:
    """The apps/v1 Deployment of one pool; `sidecar`: the host-memory attention pool whose
    worker runs in each of its pods (`sidecar_attention_pool`)."""
    labels = pool_labels(owner, pool)
    selector = {
        DEPLOYMENT_LABEL: labels[DEPLOYMENT_LABEL],
        POOL_LABEL: labels[POOL_LABEL],
    }
    container: dict[str, Any] = {
        "name": ENGINE_CONTAINER,
        "image": spec.engine.container_image,
        "command": list(ENGINE_COMMAND),
        "args": engine_args(owner, spec, plan, pool, sidecar_attention=sidecar is not None),
        "ports": [{"name": PORT_NAME, "containerPort": spec.engine.port, "protocol": "TCP"}],
        "resources": resources_for(class_spec, pool.tensor_parallel),
        **http_probes(PORT_NAME),
    }
    if pool.role is PoolRole.ATTENTION:
        container["ports"].append(
            {"name": ATTENTION_PORT_NAME, "containerPort": attention_port(spec), "protocol": "TCP"}
        )
    if spec.engine.kind is EngineKind.VLLM:
        as_vllm(container, owner, spec, pool)
    pod_spec: dict[str, Any] = {"containers": [container]}
    if sidecar is not None:
        pod_spec["containers"].append(attention_sidecar(owner, spec, plan, *sidecar))
    drain = drain_command(owner, spec, plan, pool)
    if drain is not None:
        # Scale-down and rollouts drain: the preStop hook migrates the running requests away
        # (the pod turns unready at once); the kubelet waits for it up to the grace period.
        container["lifecycle"] = {"preStop": {"exec": {"command": drain}}}
        container.setdefault("env", []).append(
            {"name": POD_IP_ENV, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
        )
        pod_spec["terminationGracePeriodSeconds"] = (
            spec.autoscaling.drain_deadline_seconds + DRAIN_GRACE_MARGIN_S
        )
    affinity = node_affinity(class_spec)
    if affinity is not None:
        pod_spec["affinity"] = affinity
    if class_spec.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in class_spec.tolerations]
    if spec.priority_class_name:
        pod_spec["priorityClassName"] = spec.priority_class_name
    return owned_deployment(
        owner, workload_name(owner, pool), labels, selector, pool.replicas, pod_spec
    )


def colocated_service_name(owner: Owner) -> str:
    return dns_label(f"{owner.name}-colocated")


def peers_service_name(owner: Owner, plan: Plan, pool: PoolPlan) -> str | None:
    """The headless Service whose name resolves to a pool's migration peers: the decode
    Service of a disaggregated plan, `<md>-colocated` where `has_colocated_peers_service` renders
    it; None when there is none (a drain then only waits for its requests to finish)."""
    if pool.role is PoolRole.DECODE and is_disaggregated(plan):
        return decode_service_name(owner)
    if pool.role is PoolRole.COLOCATED:
        return colocated_service_name(owner)
    return None


def has_colocated_peers_service(spec: ModelDeploymentSpec, plan: Plan) -> bool:
    """A colocated plan of `tessera serve` pods under the closed loop gets a headless Service of
    its colocated pods, for drains to find migration peers by DNS."""
    return (
        spec.autoscaling.enabled
        and spec.engine.kind is EngineKind.TESSERA
        and any(p.role is PoolRole.COLOCATED for p in plan.pools)
    )


def drain_command(
    owner: Owner, spec: ModelDeploymentSpec, plan: Plan, pool: PoolPlan
) -> list[str] | None:
    """The preStop hook of a pool's pods: `tessera drain` (agents/serving/drain_hook.py) asks
    the local server to migrate its running requests to its peers within the deadline. Only
    `tessera serve` pods that stream answers (colocated, decode) drain."""
    if spec.engine.kind is not EngineKind.TESSERA or pool.role not in (
        PoolRole.COLOCATED,
        PoolRole.DECODE,
    ):
        return None
    command = [
        *DRAIN_COMMAND,
        f"--port={spec.engine.port}",
        f"--deadline-s={spec.autoscaling.drain_deadline_seconds}",
    ]
    peers = peers_service_name(owner, plan, pool)
    if peers is not None and (
        pool.role is PoolRole.DECODE or has_colocated_peers_service(spec, plan)
    ):
        command.append(f"--peers={peers}.{owner.namespace}.svc:{spec.engine.port}")
    return command


def _service(
    owner: Owner, name: str, selector: dict[str, str], port: int, headless: bool
) -> dict[str, Any]:
    labels = {NAME_LABEL: ENGINE_NAME, **selector_labels(owner)}
    spec: dict[str, Any] = {
        "type": "ClusterIP",
        "selector": selector,
        "ports": [{"name": PORT_NAME, "port": port, "targetPort": PORT_NAME, "protocol": "TCP"}],
    }
    if headless:
        spec["clusterIP"] = "None"
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": owner.namespace,
            "labels": labels,
            "ownerReferences": [owner.reference()],
        },
        "spec": spec,
    }
    return with_config_hash(service)


def render_services(owner: Owner, spec: ModelDeploymentSpec, plan: Plan) -> list[dict[str, Any]]:
    """The entry Service (the router's pods in a disaggregated plan, else the entry pools), the
    headless prefill and decode Services of a disaggregated plan, and the headless colocated
    Service of an autoscaled colocated plan (drain peers)."""
    deployment = label_value(owner.name)
    entry = entry_selector(owner, plan)
    services = [_service(owner, service_name(owner), entry, spec.engine.port, headless=False)]
    if is_disaggregated(plan):
        for name, role in (
            (prefill_service_name(owner), PoolRole.PREFILL),
            (decode_service_name(owner), PoolRole.DECODE),
        ):
            selector = {DEPLOYMENT_LABEL: deployment, ROLE_LABEL: role.value}
            services.append(_service(owner, name, selector, spec.engine.port, headless=True))
    if has_colocated_peers_service(spec, plan):
        colocated = {DEPLOYMENT_LABEL: deployment, ROLE_LABEL: PoolRole.COLOCATED.value}
        name = colocated_service_name(owner)
        services.append(_service(owner, name, colocated, spec.engine.port, headless=True))
    return services


def headless_url(owner: Owner, spec: ModelDeploymentSpec, name: str) -> str:
    """The base URL of a headless Service: its name resolves to the ready pods' IPs."""
    return f"http://{name}.{owner.namespace}.svc:{spec.engine.port}"


def router_labels(owner: Owner) -> dict[str, str]:
    return {
        NAME_LABEL: ROUTER_NAME,
        MANAGED_BY_LABEL: MANAGED_BY,
        DEPLOYMENT_LABEL: label_value(owner.name),
        ROLE_LABEL: ROUTER_ROLE,
    }


def router_args(owner: Owner, spec: ModelDeploymentSpec) -> list[str]:
    """`tessera router` flags: the pools' headless Services (re-resolved each probe interval,
    so the router follows scale-ups and replaced pods) and the entry port."""
    return [
        f"--prefill-service={headless_url(owner, spec, prefill_service_name(owner))}",
        f"--decode-service={headless_url(owner, spec, decode_service_name(owner))}",
        f"--port={spec.engine.port}",
    ]


def render_router(owner: Owner, spec: ModelDeploymentSpec) -> dict[str, Any]:
    """The apps/v1 Deployment of `tessera router`, the endpoint of a disaggregated plan."""
    labels = router_labels(owner)
    container: dict[str, Any] = {
        "name": ROUTER_CONTAINER,
        "image": spec.engine.container_image,
        "command": list(ROUTER_COMMAND),
        "args": router_args(owner, spec),
        "ports": [{"name": PORT_NAME, "containerPort": spec.engine.port, "protocol": "TCP"}],
        "resources": {key: dict(value) for key, value in ROUTER_RESOURCES.items()},
        **http_probes(PORT_NAME, ready_period_s=2, liveness_failures=3),
    }
    pod_spec: dict[str, Any] = {"containers": [container]}
    if spec.priority_class_name:
        pod_spec["priorityClassName"] = spec.priority_class_name
    selector = {key: labels[key] for key in (DEPLOYMENT_LABEL, ROLE_LABEL)}
    return owned_deployment(owner, router_name(owner), labels, selector, ROUTER_REPLICAS, pod_spec)


class UnknownAcceleratorClassError(KeyError):
    """The plan names a class that is not among the classes given to the renderer."""


def render_children(
    owner: Owner,
    spec: ModelDeploymentSpec,
    plan: Plan,
    classes: Mapping[str, AcceleratorClassSpec],
) -> list[dict[str, Any]]:
    """Every object that runs the plan: Deployments (one per pool, then the router of a
    disaggregated plan) first, then Services."""
    children: list[dict[str, Any]] = []
    for pool in plan.pools:
        class_spec = classes.get(pool.accelerator_class)
        if class_spec is None:
            raise UnknownAcceleratorClassError(
                f"pool {pool.name} runs on AcceleratorClass {pool.accelerator_class}, "
                f"which is not defined (have: {', '.join(sorted(classes)) or 'none'})"
            )
        if pool.role is PoolRole.ATTENTION and is_host_memory(class_spec):
            continue  # its workers run in its decode pool's pods (sidecar_attention_pool)
        sidecar = sidecar_attention_pool(plan, pool, classes)
        children.append(render_deployment(owner, spec, plan, pool, class_spec, sidecar))
    if is_disaggregated(plan):
        children.append(render_router(owner, spec))
    children.extend(render_services(owner, spec, plan))
    children.extend(render_attention_services(owner, spec, plan, classes))
    return children


def render_attention_services(
    owner: Owner,
    spec: ModelDeploymentSpec,
    plan: Plan,
    classes: Mapping[str, AcceleratorClassSpec],
) -> list[dict[str, Any]]:
    """A headless Service per attention pool of its own pods, on its session port: the name its
    decode pool's pods are given (`--attention-service`); each decode replica claims one idle
    worker. Host-memory pools have none: their workers are sidecars."""
    services = []
    for pool in plan.pools:
        if pool.role is not PoolRole.ATTENTION:
            continue
        class_spec = classes.get(pool.accelerator_class)
        if class_spec is not None and is_host_memory(class_spec):
            continue
        selector = {DEPLOYMENT_LABEL: label_value(owner.name), POOL_LABEL: label_value(pool.name)}
        service = _service(
            owner, attention_service_name(owner, pool), selector, attention_port(spec), True
        )
        service["spec"]["ports"] = [
            {
                "name": ATTENTION_PORT_NAME,
                "port": attention_port(spec),
                "targetPort": ATTENTION_PORT_NAME,
                "protocol": "TCP",
            }
        ]
        del service["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]
        services.append(with_config_hash(service))
    return services
