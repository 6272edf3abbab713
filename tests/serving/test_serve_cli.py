"""`tessera serve`'s flags against what the operator renders, its one-line errors, and the image.

Every example ModelDeployment is planned in each serving mode the planner can place, rendered,
and each engine pod's arguments are parsed with the server's own parser, each router pod's with
`tessera router`'s: a flag the renderer emits and the program does not know fails here, not in
a crash-looping pod.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from api_samples import EXAMPLES, example_documents
from click.testing import CliRunner
from tessera.agents.serving import cli as serve_cli
from tessera.api.accelerator_class import AcceleratorClass, AcceleratorClassSpec
from tessera.api.model_deployment import EngineSpec, ModelDeploymentSpec
from tessera.operator import render
from tessera.policies.capacity import ClassOffer
from tessera.policies.placement import plan_deployment

from tessera.cli import main

REPO = EXAMPLES.parent
MODES = ["auto", "colocated", "disaggregated", "attention-offload"]


def example_classes() -> dict[str, AcceleratorClassSpec]:
    documents = example_documents("accelerator-classes.yaml") + example_documents(
        "experiments/h20-class.yaml"
    )
    resources = [AcceleratorClass.model_validate(d) for d in documents]
    return {r.metadata.name: r.spec for r in resources}


def example_deployments() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted([*EXAMPLES.glob("*.yaml"), *EXAMPLES.glob("experiments/*.yaml")]):
        for document in yaml.safe_load_all(path.read_text()):
            if document and document.get("kind") == "ModelDeployment":
                found.append((path.name, document))
    return found


def rendered_pods(container_name: str) -> list[tuple[str, list[str], list[str]]]:
    """(where, command, args) of every `container_name` container of every example plan."""
    classes = example_classes()
    offers = [ClassOffer(name, spec) for name, spec in classes.items()]
    pods = []
    for name, document in example_deployments():
        for mode in MODES:
            spec = ModelDeploymentSpec.model_validate({**document["spec"], "servingMode": mode})
            plan = plan_deployment(spec, offers)
            if not plan.pools:
                continue
            owner = render.Owner(document["metadata"]["name"], "serving", "uid-1")
            for child in render.render_children(owner, spec, plan, classes):
                if child["kind"] == "Deployment":
                    container = child["spec"]["template"]["spec"]["containers"][0]
                    if container["name"] != container_name:
                        continue
                    where = f"{name}:{mode}:{child['metadata']['name']}"
                    pods.append((where, container["command"], container["args"]))
    return pods


PODS = rendered_pods(render.ENGINE_CONTAINER)
ROUTERS = rendered_pods(render.ROUTER_CONTAINER)


def test_the_examples_render_pods_of_every_role() -> None:
    roles = {
        re.sub(r"--role=", "", a) for _, _, args in PODS for a in args if a.startswith("--role")
    }
    assert {"colocated", "prefill", "decode"} <= roles
    assert len(PODS) >= 10


@pytest.mark.parametrize(("where", "command", "args"), PODS, ids=[p[0] for p in PODS])
def test_every_rendered_flag_is_a_tessera_serve_flag(
    where: str, command: list[str], args: list[str]
) -> None:
    assert command == list(render.ENGINE_COMMAND) == ["tessera", "serve"]
    context = serve_cli.serve_command.make_context("serve", list(args))
    params = context.params
    for arg in args:
        name, _, value = arg.removeprefix("--").partition("=")
        if value:
            assert str(params[name.replace("-", "_")]) == value, arg
    if "--no-enable-chunked-prefill" in args:
        assert params["enable_chunked_prefill"] is False
    assert params["pool"]


def test_every_disaggregated_example_renders_a_router() -> None:
    disaggregated = {where.rsplit(":", 1)[0] for where, _, args in PODS if "--role=prefill" in args}
    assert disaggregated, "the examples must include a disaggregated plan"
    assert {where.rsplit(":", 1)[0] for where, _, _ in ROUTERS} == disaggregated


@pytest.mark.parametrize(("where", "command", "args"), ROUTERS, ids=[p[0] for p in ROUTERS])
def test_every_rendered_router_flag_is_a_tessera_router_flag(
    where: str, command: list[str], args: list[str]
) -> None:
    from tessera.agents.router.cli import router_command

    assert command == list(render.ROUTER_COMMAND) == ["tessera", "router"]
    params = router_command.make_context("router", list(args)).params
    for arg in args:
        name, _, value = arg.removeprefix("--").partition("=")
        parsed = params[name.replace("-", "_")]
        assert value in parsed if isinstance(parsed, tuple) else str(parsed) == value, arg
    deployment = where.split(":")[2].removesuffix("-router")
    assert params["prefill_service"] == (f"http://{deployment}-prefill.serving.svc:8000",)
    assert params["decode_service"] == (f"http://{deployment}-decode.serving.svc:8000",)


def run_serve(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["serve", *args])
    return result.exit_code, result.stderr


@pytest.mark.parametrize("uri", ["s3://bucket/llama", "hf://meta-llama/Llama-3-8B", "gs://b/m"])
def test_weights_the_server_cannot_fetch_are_a_one_line_error(uri: str) -> None:
    code, stderr = run_serve("--model=m", f"--weights-uri={uri}")
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    scheme = uri.split(":")[0]
    assert "--weights-uri" in lines[0] and repr(scheme) in lines[0] and "local folder" in lines[0]


def test_bad_local_weights_roles_and_lengths_are_named(tiny_model: Path, tmp_path: Path) -> None:
    cases = [
        (["--model=m", f"--weights-uri={tmp_path}"], "no config.json"),
        (["--model=m"], "--weights-uri: not given"),
        (
            [f"--model={tiny_model}", "--role=attention", "--attention-service=a:1"],
            "--attention-service: the attention role",
        ),
        ([f"--model={tiny_model}", "--attention-service=a:0"], "--attention-service 'a:0'"),
        (
            [f"--model={tiny_model}", "--role=decode", "--fault-corrupt-kv-every=2"],
            "--fault-corrupt-kv-every: a test hook of the prefill role only",
        ),
        ([f"--model={tiny_model}", "--port=8000", "--kv-port=8000"], "--kv-port 8000"),
        (
            [f"--model={tiny_model}", "--tensor-parallel-size=4"],
            "--tensor-parallel-size 4: tensor_parallel_size 4 does not divide num_key_value_heads",
        ),
        (
            [f"--model={tiny_model}", "--tensor-parallel-size=2", "--device=cuda:1"],
            "--device cuda:1",
        ),
        ([f"--model={tiny_model}", "--dtype=fp8"], "--dtype fp8"),
        ([f"--model={tiny_model}", "--max-model-len=999999"], "--max-model-len 999999"),
    ]
    for args, message in cases:
        code, stderr = run_serve(*args)
        assert code == 2, (args, stderr)
        assert len(stderr.strip().splitlines()) == 1 and message in stderr, (args, stderr)
    code, stderr = run_serve("--model=m", "--port=0")
    assert code == 2 and "--port" in stderr


def test_a_missing_serve_extra_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a)
    )
    with pytest.raises(SystemExit) as raised:
        serve_cli.check_serve_extra()
    assert raised.value.code == 2


def test_the_image_entry_point_is_the_command_the_operator_and_chart_run() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    entrypoints = re.findall(r"^ENTRYPOINT\s+(\[.*\])\s*$", dockerfile, re.MULTILINE)
    assert len(entrypoints) == 1
    entrypoint = json.loads(entrypoints[0])
    assert entrypoint == list(render.ENGINE_COMMAND[:1])
    for template in ("operator-deployment.yaml", "agent-daemonset.yaml"):
        text = (REPO / "helm/tessera/templates" / template).read_text()
        assert f"command: {json.dumps(entrypoint)}" in text, template
    assert re.search(
        r'^tessera = "tessera\.cli:main"$', (REPO / "pyproject.toml").read_text(), re.M
    )
    assert 'pip install ".[serve]"' in dockerfile


def test_the_engine_image_is_the_charts_image() -> None:
    values = yaml.safe_load((REPO / "helm/tessera/values.yaml").read_text())["image"]
    chart = yaml.safe_load((REPO / "helm/tessera/Chart.yaml").read_text())
    chart_image = f"{values['registry']}/{values['repository']}:{chart['appVersion']}"
    assert EngineSpec().container_image == chart_image


def test_a_gpu_memory_share_needs_a_gpu_a_sized_kv_cache_and_one_process(
    tiny_model: Path,
) -> None:
    cases = [
        (["--device=cpu", "--num-kv-blocks=64"], "--gpu-memory-fraction 0.45: the engine runs on"),
        (["--device=cuda"], "--gpu-memory-fraction 0.45: give --num-kv-blocks too"),
        (["--num-kv-blocks=64", "--tensor-parallel-size=2"], "not with --tensor-parallel-size"),
    ]
    for args, message in cases:
        code, stderr = run_serve(f"--model={tiny_model}", "--gpu-memory-fraction=0.45", *args)
        assert code == 2, (args, stderr)
        assert len(stderr.strip().splitlines()) == 1 and message in stderr, (args, stderr)
    for bad in ("0", "1.5", "-0.2"):
        code, stderr = run_serve(f"--model={tiny_model}", f"--gpu-memory-fraction={bad}")
        assert code == 2 and "--gpu-memory-fraction" in stderr and "0<x<=1" in stderr, stderr


def test_the_gpu_memory_share_is_set_before_the_server_loads(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    from tessera.agents.serving import server

    calls: list[tuple[str, object, object]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(
        torch.cuda,
        "set_per_process_memory_fraction",
        lambda fraction, device=None: calls.append(("limit", fraction, device)),
    )
    monkeypatch.setattr(server, "run", lambda config: calls.append(("run", config.device, 0)) or 0)
    args = ["--gpu-memory-fraction=0.45", "--num-kv-blocks=64"]
    code, stderr = run_serve(f"--model={tiny_model}", *args, "--device=cuda:1")
    assert code == 0, stderr
    assert calls == [("limit", 0.45, 1), ("run", "cuda:1", 0)]
    calls.clear()
    code, stderr = run_serve(f"--model={tiny_model}", *args)
    assert code == 0, stderr
    assert calls == [("limit", 0.45, 0), ("run", None, 0)]
    calls.clear()
    code, _ = run_serve(f"--model={tiny_model}", "--num-kv-blocks=64", "--device=cuda:1")
    assert code == 0 and calls == [("run", "cuda:1", 0)]  # no flag, no limit
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, stderr = run_serve(f"--model={tiny_model}", *args)
    assert code == 2 and "--gpu-memory-fraction 0.45: no CUDA device" in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1
