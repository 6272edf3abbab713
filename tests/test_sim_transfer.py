"""KV transfers refuse a bandwidth that would make them take negative, zero or NaN time."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from sim_samples import cluster, plan, pool, simulate, workload
from tessera.api.model_deployment import PoolRole
from tessera.sim.transfer import KvLinks


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
