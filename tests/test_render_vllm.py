"""`spec.engine.kind: vllm`: every example deployment, planned colocated and rendered for vLLM,
runs `vllm serve` from vLLM's image with only flags that vLLM documents, carrying the plan's
parallelism, context and scheduler settings; the pods are valid Kubernetes objects.

VLLM_FLAGS is the list of `vllm serve` flags this renderer may emit, as vLLM documents them:
the engine arguments (https://docs.vllm.ai/en/v0.8.5/serving/engine_args.html: --tensor-parallel-
size, --dtype {auto,half,float16,bfloat16,float,float32}, --max-model-len, --max-num-seqs,
--max-num-batched-tokens, --quantization ...), the OpenAI server's (--host, --port,
--served-model-name), and the boolean pair --enable-chunked-prefill / --no-enable-chunked-prefill
of vLLM's SchedulerConfig (V1 parses booleans as --flag / --no-flag).
"""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
from api_samples import EXAMPLES, example_classes
from pydantic import ValidationError
from tessera.api.model_deployment import VLLM_IMAGE, EngineKind, ModelDeploymentSpec
from tessera.operator import render
from tessera.policies.capacity import ClassOffer
from tessera.policies.placement import plan_deployment

VLLM_FLAGS = {
    "--host",
    "--port",
    "--served-model-name",
    "--tensor-parallel-size",
    "--dtype",
    "--max-model-len",
    "--max-num-seqs",
    "--max-num-batched-tokens",
    "--enable-chunked-prefill",
    "--no-enable-chunked-prefill",
    "--quantization",
}
VLLM_DTYPES = {"auto", "half", "float16", "bfloat16", "float", "float32"}


def vllm_deployments() -> list[tuple[str, dict[str, Any]]]:
    """Every example ModelDeployment's spec, as a colocated vLLM deployment."""
    import yaml

    found = []
    for path in sorted([*EXAMPLES.glob("*.yaml"), *EXAMPLES.glob("experiments/*.yaml")]):
        for document in yaml.safe_load_all(path.read_text()):
            if document and document.get("kind") == "ModelDeployment":
                spec = {**document["spec"], "servingMode": "colocated", "engine": {"kind": "vllm"}}
                found.append((f"{path.name}:{document['metadata']['name']}", spec))
    return found


DEPLOYMENTS = vllm_deployments()


@pytest.mark.parametrize(("where", "document"), DEPLOYMENTS, ids=[d[0] for d in DEPLOYMENTS])
def test_vllm_pods_run_vllm_serve_with_documented_flags_carrying_the_plan(
    where: str, document: dict[str, Any]
) -> None:
    spec = ModelDeploymentSpec.model_validate(document)
    offers = [ClassOffer(name, class_spec) for name, class_spec in example_classes().items()]
    plan = plan_deployment(spec, offers)
    if not plan.pools:
        pytest.skip(f"{where}: no colocated plan fits the example fleet")
    owner = render.Owner("chat", "serving", "uid-1")
    deployments = [
        c
        for c in render.render_children(owner, spec, plan, example_classes())
        if c["kind"] == "Deployment"
    ]
    assert len(deployments) == len(plan.pools)
    for deployment, pool in zip(deployments, plan.pools, strict=True):
        kubernetes_validate.validate(deployment, "1.29", strict=True)
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["image"] == VLLM_IMAGE
        assert container["command"] == ["vllm", "serve"]
        model, *flags = container["args"]
        assert not model.startswith("-"), "vllm serve takes the model as its first argument"
        values: dict[str, str] = {}
        for arg in flags:
            name, _, value = arg.partition("=")
            assert name in VLLM_FLAGS, f"{where}: {name} is not a documented vllm serve flag"
            values[name] = value
        scheduler = pool.scheduler(spec.model.architecture.max_context_tokens)
        assert values["--tensor-parallel-size"] == str(pool.tensor_parallel)
        assert values["--max-num-seqs"] == str(scheduler.max_num_seqs)
        assert values["--max-num-batched-tokens"] == str(scheduler.max_num_batched_tokens)
        chunked = "--enable-chunked-prefill" if scheduler.enable_chunked_prefill else None
        assert (chunked or "--no-enable-chunked-prefill") in values
        assert values["--max-model-len"] == str(spec.model.architecture.max_context_tokens)
        assert values["--dtype"] in VLLM_DTYPES
        assert values["--port"] == str(spec.engine.port)
        assert values["--served-model-name"] == owner.name
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert container[probe]["httpGet"]["path"] == "/health", probe


def test_the_model_argument_follows_the_weights_uri() -> None:
    base = DEPLOYMENTS[0][1]
    for uri, expected in [
        (None, base["model"]["name"]),
        ("file:///models/llama", "/models/llama"),
        ("hf://meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B"),
        ("s3://bucket/llama", "s3://bucket/llama"),
    ]:
        model = {k: v for k, v in base["model"].items() if k != "weightsUri"}
        if uri:
            model["weightsUri"] = uri
        spec = ModelDeploymentSpec.model_validate({**base, "model": model})
        assert render.vllm_model(spec) == expected


def test_extra_args_come_last_and_the_tessera_kind_is_unchanged() -> None:
    base = DEPLOYMENTS[0][1]
    spec = ModelDeploymentSpec.model_validate(
        {**base, "engine": {"kind": "vllm", "extraArgs": ["--max-num-seqs=8"]}}
    )
    plan = plan_deployment(spec, [ClassOffer(n, c) for n, c in example_classes().items()])
    args = render.vllm_args(render.Owner("chat", "serving", "u"), spec, plan.pools[0])
    assert args[-1] == "--max-num-seqs=8"
    tessera = ModelDeploymentSpec.model_validate({**base, "engine": {}})
    assert tessera.engine.kind is EngineKind.TESSERA
    assert tessera.engine.container_image != VLLM_IMAGE


@pytest.mark.parametrize("mode", ["auto", "disaggregated", "attention-offload"])
def test_vllm_with_split_roles_is_refused_naming_the_fields(mode: str) -> None:
    with pytest.raises(ValidationError, match=r"engine\.kind vllm serves colocated pools only"):
        ModelDeploymentSpec.model_validate(
            {**DEPLOYMENTS[0][1], "servingMode": mode, "engine": {"kind": "vllm"}}
        )
