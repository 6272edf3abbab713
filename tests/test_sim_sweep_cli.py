"""Goodput sweeps, baseline plans and the `tessera simulate` command end to end."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from sim_samples import cluster, deployment, plan, pool, schedulers, simulate, workload
from tessera.api.model_deployment import PoolRole, ServingMode
from tessera.sim.baselines import Baseline, setups_for
from tessera.sim.metrics import RunResult, goodput_sweep

from tessera.cli import main

# Fixed lengths, evenly spaced: the only thing a rate scale changes is the spacing.
STEADY = workload([i * 0.25 for i in range(240)], [1200] * 240, [150] * 240)


def _sweep(replicas: int) -> list[tuple[float, float, bool]]:
    def run_at(scale: float) -> RunResult:
        return simulate(
            plan(pool(PoolRole.COLOCATED, "a100", replicas)),
            STEADY.scaled(scale),
            scheduler=schedulers(chunked=True, budget=512),
        )[1]

    result = goodput_sweep("sarathi", run_at, STEADY.rate_per_s, bisections=4)
    return [(p.rate_scale, p.attainment, p.meets_targets) for p in result.points] + [
        (result.goodput_scale, float("nan"), True)
    ]


def test_attainment_falls_with_rate_and_goodput_is_the_edge() -> None:
    *points, (goodput, _, _) = _sweep(1)
    attainments = [a for _, a, _ in points]
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(attainments))
    passing = [s for s, _, ok in points if ok]
    failing = [s for s, _, ok in points if not ok]
    assert passing and failing, "the sweep must bracket the goodput"
    assert goodput == max(passing) < min(failing)
    assert min(failing) / goodput < 1.2  # bisection narrowed the edge


def test_more_replicas_never_lower_goodput() -> None:
    one = _sweep(1)[-1][0]
    two = _sweep(2)[-1][0]
    assert two >= one > 0


def test_baselines_plan_their_serving_modes_on_the_cluster() -> None:
    dep = deployment()
    modes = {
        baseline: setups_for(baseline, [dep], cluster({"h100": 1, "a100": 2}))[0].plan.mode
        for baseline in Baseline
    }
    assert modes[Baseline.VLLM] is modes[Baseline.SARATHI] is ServingMode.COLOCATED
    assert modes[Baseline.DISAGGREGATED] is ServingMode.DISAGGREGATED
    assert modes[Baseline.ATTENTION_OFFLOAD] is ServingMode.ATTENTION_OFFLOAD
    setups = {b: setups_for(b, [dep], cluster())[0] for b in (Baseline.VLLM, Baseline.SARATHI)}
    context = dep.spec.model.architecture.max_context_tokens
    runs = {b: s.plan.pools[0].scheduler(context) for b, s in setups.items()}
    assert not runs[Baseline.VLLM].enable_chunked_prefill
    assert runs[Baseline.SARATHI].enable_chunked_prefill
    # The same replicas; each plan records the scheduler it runs.
    (vllm,), (sarathi,) = (setups[b].plan.pools for b in (Baseline.VLLM, Baseline.SARATHI))
    assert (vllm.prefill_chunk_tokens, sarathi.prefill_chunk_tokens) == (None, 512)
    assert vllm.model_copy(update={"prefill_chunk_tokens": 512}) == sarathi


def test_simulate_command_writes_table_json_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "out"
    runner = CliRunner()
    result = runner.invoke(
        main,
        [
            "simulate",
            "--window",
            "90",
            "--policy",
            "vllm",
            "--policy",
            "disaggregated",
            "--sweep-steps",
            "1",
            "--per-request",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "latency and SLO" in result.output and "goodput" in result.output
    document = json.loads((out / "results.json").read_text())
    runs = {run["summary"]["policy"]: run for run in document["runs"]}
    assert set(runs) == {"vllm", "disaggregated"}
    requests = document["config"]["requests"]
    assert requests > 300
    for run in runs.values():
        assert run["summary"]["finished"] + run["summary"]["rejected"] == requests
        assert run["sweep"]["goodput_rate_per_s"] >= 0
        assert run["power_timeline"]["power_w"]
    assert runs["disaggregated"]["summary"]["kv_transfers"] >= requests
    for name in ("latency_cdf.png", "attainment_vs_rate.png", "power.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    lines = (out / "requests-vllm.csv").read_text().splitlines()
    assert len(lines) == requests + 1


def test_simulate_command_synthetic_with_power_cap(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main,
        [
            "simulate",
            "--synthetic",
            "gamma",
            "--duration",
            "60s",
            "--policy",
            "sarathi",
            "--no-sweep",
            "--no-plots",
            "--power-cap",
            "a100=250",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "results.json").read_text())
    assert document["config"]["power_cap_w"] == {"a100": 250.0}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--power-cap", "a100"], "CLASS=WATTS"),
        (["--power-cap", "a100=20"], "outside"),
        (["--trace", "nope"], "bundled trace"),
        (["--window", "9:3"], "ends before"),
    ],
)
def test_simulate_command_reports_bad_input(args: list[str], message: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["simulate", "--no-sweep", "--out", str(tmp_path), *args])
    assert result.exit_code != 0
    assert message in result.output


def test_two_deployments_share_the_cluster_and_split_the_trace() -> None:
    from api_samples import chat_deployment
    from tessera.api.model_deployment import ModelDeployment
    from tessera.sim.experiment import WorkloadSpec, run_policy
    from tessera.sim.workload import resolve_trace

    second = chat_deployment()
    second["metadata"]["name"] = "batch-chat"
    second["spec"]["slo"].update(ttftMs=5000, tpotMs=200)
    second["spec"]["traffic"]["requestRatePerSecond"] = 2.7
    deployments = [deployment(), ModelDeployment.model_validate(second)]
    spec = WorkloadSpec(trace=resolve_trace("azure-conv"), window_s=(0.0, 120.0), seed=4)
    workloads = spec.build(deployments)
    assert len(workloads[0]) == pytest.approx(2 * len(workloads[1]), rel=0.25)
    the_cluster = cluster({"h100": 1, "a100": 2})
    result = run_policy(Baseline.TESSERA, the_cluster, deployments, workloads)
    assert (result.finish_count == 1).all()
    assert result.deployments == ["llama3-8b-chat", "batch-chat"]
    assert {p.deployment for p in result.pools} == {"llama3-8b-chat", "batch-chat"}
    assert result.attainment(1) >= result.attainment(0)  # looser SLO, half the traffic
    used: dict[str, int] = {}
    for p in result.pools:
        used[p.accelerator_class] = used.get(p.accelerator_class, 0) + p.devices
    assert all(used[name] <= the_cluster.accelerators(name) for name in used)
