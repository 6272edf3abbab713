"""KV transfers refuse a bandwidth that would make them take negative, zero or NaN time, and a
measured transport (latency + bandwidth fitted to bench/kv_transfer_bench.py's rows) sets them."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from sim_samples import cluster, plan, pool, simulate, workload
from tessera.api.model_deployment import PoolRole
from tessera.sim.transfer import KvLinks, MeasuredTransport

MEASURED_CPU = Path(__file__).parent.parent / "bench/results/kv_transfer_cpu.json"


@pytest.mark.parametrize("gbps", [-5.0, 0.0, math.nan, math.inf])
def test_a_bad_link_bandwidth_is_refused_naming_it(gbps: float) -> None:
    with pytest.raises(ValueError, match=r"kvLinkGbps\) must be a finite number > 0 GB/s"):
        KvLinks(gbps)


def test_a_negative_link_cannot_lower_ttft() -> None:
    """`--kv-link-gbps -5` used to make every KV transfer take negative time."""
    disaggregated = plan(pool(PoolRole.PREFILL, "a100", 1), pool(PoolRole.DECODE, "a100", 1))
    requests = workload([0.0, 0.5, 1.0], [2000, 2000, 2000], [20, 20, 20])
    _, slow = simulate(disaggregated, requests, replace(cluster(), kv_link_gbps=1.0))
    _, fast = simulate(disaggregated, requests, replace(cluster(), kv_link_gbps=100.0))
    assert slow.ttft_s.mean() > fast.ttft_s.mean() > 0
    with pytest.raises(ValueError, match="kvLinkGbps"):
        simulate(disaggregated, requests, replace(cluster(), kv_link_gbps=-5.0))


# --- measured transports (bench/kv_transfer_bench.py's numbers) ------------------------------


def bench_rows(latency_s: float, gbps: float) -> list[dict[str, Any]]:
    """Transfer rows as the bench writes them, for a transport of this latency and bandwidth,
    with a little noise either way."""
    rows = []
    for tokens, wobble in ((256, 1.02), (1024, 0.99), (4096, 1.01), (8192, 1.0)):
        nbytes = tokens * 131072
        seconds = latency_s + nbytes / (gbps * 1e9)
        rows.append(
            {
                "transport": "tcp",
                "tokens": tokens,
                "bytes": nbytes,
                "seconds": [seconds * wobble, seconds / wobble],
            }
        )
    return rows


def test_the_fit_recovers_latency_and_bandwidth() -> None:
    (fit,) = MeasuredTransport.fit_rows(bench_rows(0.004, 2.5)).values()
    assert fit.name == "tcp" and fit.samples == 8
    assert fit.bandwidth_gbps == pytest.approx(2.5, rel=0.03)
    assert fit.latency_s == pytest.approx(0.004, abs=0.002)


def test_a_fit_needs_two_sizes_and_growth() -> None:
    with pytest.raises(ValueError, match="at least two sizes"):
        MeasuredTransport.fit("tcp", [(1e6, 0.01), (1e6, 0.02)])
    with pytest.raises(ValueError, match="do not grow with size"):
        MeasuredTransport.fit("tcp", [(1e6, 0.02), (1e7, 0.01)])
    clamped = MeasuredTransport.fit("tcp", [(1e6, 0.0001), (1e8, 0.05), (2e8, 0.1)])
    assert clamped.latency_s == 0.0 and clamped.bandwidth_gbps > 0


def test_the_bench_file_is_read_and_a_missing_transport_named(tmp_path: Path) -> None:
    path = tmp_path / "kv_transfer.json"
    path.write_text(json.dumps({"device": "cpu", "transfer": bench_rows(0.002, 1.5)}))
    fit = MeasuredTransport.from_bench(path)
    assert fit.bandwidth_gbps == pytest.approx(1.5, rel=0.03) and str(path) in fit.source
    with pytest.raises(ValueError, match="no cuda_ipc measurements"):
        MeasuredTransport.from_bench(path, "cuda_ipc")


def test_the_committed_cpu_measurement_fits() -> None:
    fit = MeasuredTransport.from_bench(MEASURED_CPU)
    assert 0 < fit.bandwidth_gbps < 100 and 0 <= fit.latency_s < 1


def test_a_measured_transport_sets_every_transfer_time_in_the_simulator() -> None:
    disaggregated = plan(pool(PoolRole.PREFILL, "a100", 1), pool(PoolRole.DECODE, "a100", 1))
    requests = workload([0.0, 5.0, 10.0], [2000, 2000, 2000], [20, 20, 20])
    slow = MeasuredTransport("tcp", latency_s=0.5, bandwidth_gbps=0.1, samples=2)
    _, base = simulate(disaggregated, requests, cluster())
    _, measured = simulate(disaggregated, requests, replace(cluster(), kv_transport=slow))
    # 2000 tokens of the sample model's KV at 0.1 GB/s plus 0.5 s, on every (unqueued) request
    added = measured.ttft_s - base.ttft_s
    assert added.min() > 0.5
    links = KvLinks(measured=slow)
    assert links.measured is slow


def test_a_simulated_cluster_reads_its_measured_transport_relative_to_its_file(
    tmp_path: Path,
) -> None:
    from tessera.sim.cluster import ClusterError, load_cluster

    (tmp_path / "results").mkdir()
    measured = tmp_path / "results/kv.json"
    measured.write_text(json.dumps({"device": "cpu", "transfer": bench_rows(0.003, 2.0)}))
    classes = (Path(__file__).parent.parent / "examples/accelerator-classes.yaml").read_text()
    document = (
        "apiVersion: tessera.dev/v1alpha1\nkind: SimulatedCluster\nmetadata: {name: lab}\n"
        "nodes: {h100: 1}\nkvTransportMeasurement: results/kv.json\n"
    )
    path = tmp_path / "cluster.yaml"
    path.write_text(classes + "\n---\n" + document)
    loaded = load_cluster([path])
    assert loaded.kv_transport is not None
    assert loaded.kv_transport.bandwidth_gbps == pytest.approx(2.0, rel=0.03)
    path.write_text(classes + "\n---\n" + document + "kvTransport: cuda_ipc\n")
    with pytest.raises(ClusterError, match=r"kvTransportMeasurement .*no cuda_ipc measurements"):
        load_cluster([path])
