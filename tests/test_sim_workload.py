"""Workloads (trace windows, rate scaling, synthetic traffic) and the simulated cluster files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from api_samples import EXAMPLES
from sim_samples import deployment
from tessera.api.model_deployment import LengthDistribution
from tessera.sim.cluster import ClusterError, load_cluster
from tessera.sim.workload import (
    TraceFormatError,
    Workload,
    bundled_trace_path,
    load_trace,
    parse_window,
    resolve_trace,
    sample_lengths,
    synthetic_workload,
)

SIM_DATA = Path(__file__).resolve().parent.parent / "sim" / "data"


SHARED_TRACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "traces"


@pytest.mark.parametrize("kind", ["conv", "code"])
def test_bundled_window_is_the_first_ten_minutes_of_the_azure_trace(kind: str) -> None:
    window = resolve_trace(f"azure-{kind}")
    assert window.arrival_s[0] == 0.0
    assert window.arrival_s[-1] < 600.0
    assert (np.diff(window.arrival_s) >= 0).all()
    assert (window.output_tokens > 0).all() and (window.prompt_tokens > 0).all()
    full_path = SHARED_TRACES / f"azure_llm_2023_{kind}.csv"
    if full_path.is_file():  # the window is an unchanged copy of the original rows
        full = load_trace(full_path).window(0, 600)
        assert np.array_equal(full.arrival_s, window.arrival_s)
        assert np.array_equal(full.prompt_tokens, window.prompt_tokens)
        assert np.array_equal(full.output_tokens, window.output_tokens)
    provenance = (SIM_DATA / "PROVENANCE.md").read_text()
    assert f"({len(window):,} requests)" in provenance


def test_bundled_data_carries_its_attribution() -> None:
    provenance = (SIM_DATA / "PROVENANCE.md").read_text()
    assert "CC-BY 4.0" in provenance and "Splitwise" in provenance
    for name in ("azure-conv", "azure-code"):
        assert bundled_trace_path(name).name in provenance


def test_example_copies_shipped_with_the_package_match_the_examples() -> None:
    for name in ("sim-cluster.yaml", "llama3-8b-chat.yaml"):
        assert (SIM_DATA / f"example-{name}").read_text() == (EXAMPLES / name).read_text()


def test_window_and_compression_scale_the_rate() -> None:
    trace = resolve_trace("azure-conv")
    part = trace.window(60, 180)
    assert part.duration_s == 120
    assert (part.arrival_s >= 0).all() and (part.arrival_s < 120).all()
    faster = part.scaled(2.0)
    assert faster.rate_per_s == pytest.approx(2 * part.rate_per_s)
    assert np.array_equal(faster.prompt_tokens, part.prompt_tokens)
    assert np.allclose(faster.arrival_s, part.arrival_s / 2)


def test_superposition_keeps_the_window_and_multiplies_requests() -> None:
    part = resolve_trace("azure-conv").window(0, 120)
    rng = np.random.default_rng(3)
    more = part.scaled(3.5, "superpose", rng)
    assert more.duration_s == part.duration_s
    assert (more.arrival_s < part.duration_s).all()
    assert (np.diff(more.arrival_s) >= 0).all()
    assert len(more) == pytest.approx(3.5 * len(part), rel=0.05)


def test_trace_errors_name_the_file_and_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("time,prompt,output\n1,2,3\n")
    with pytest.raises(TraceFormatError, match="expected columns"):
        load_trace(bad)
    with pytest.raises(FileNotFoundError, match="azure-conv"):
        resolve_trace(str(tmp_path / "missing.csv"))


TRACE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
GOOD_ROW = "2023-11-16 18:15:46.6805900,374,44\n"


@pytest.mark.parametrize(
    ("row", "column", "message"),
    [
        ("2023-11-16 18:15:47.0,0,44", "ContextTokens", "in [1, "),
        ("2023-11-16 18:15:47.0,374,0", "GeneratedTokens", "got 0"),
        ("2023-11-16 18:15:47.0,-3,44", "ContextTokens", "got -3"),
        ("2023-11-16 18:15:47.0,374,-1", "GeneratedTokens", "got -1"),
        ("2023-11-16 18:15:47.0,1e3,44", "ContextTokens", "whole number"),
        ("2023-11-16 18:15:47.0,374,99999999999999999999", "GeneratedTokens", "in [1, "),
        ("not a time,374,44", "TIMESTAMP", "expected a time"),
        ("NaT,374,44", "TIMESTAMP", "expected a time"),
        (",374,44", "TIMESTAMP", "expected a time"),
        ("2023-11-16 18:15:47.0,374", "GeneratedTokens", "no GeneratedTokens"),
    ],
)
def test_a_bad_trace_row_is_an_error_naming_file_line_and_column(
    tmp_path: Path, row: str, column: str, message: str
) -> None:
    """A request with no prompt or output tokens has no latency and used to count as meeting
    its SLO; the Azure traces hold none, so such a row is a malformed file."""
    path = tmp_path / "trace.csv"
    path.write_text(TRACE_HEADER + GOOD_ROW + GOOD_ROW + "\n" + row + "\n" + GOOD_ROW)
    with pytest.raises(TraceFormatError) as raised:
        load_trace(path)
    text = str(raised.value)
    assert str(path) in text and "line 5" in text and column in text and message in text


def test_a_trace_that_is_not_csv_text_or_spans_no_time_is_an_error(tmp_path: Path) -> None:
    binary = tmp_path / "binary.csv"
    binary.write_bytes(TRACE_HEADER.encode() + b"\xff\xfe\x00\x81,1,1\n")
    with pytest.raises(TraceFormatError, match="not a CSV text file"):
        load_trace(binary)
    for rows in (GOOD_ROW, GOOD_ROW * 3):
        instant = tmp_path / "instant.csv"
        instant.write_text(TRACE_HEADER + rows)
        with pytest.raises(TraceFormatError, match="spans no time"):
            load_trace(instant)


def test_workloads_refuse_requests_without_tokens_or_times() -> None:
    times = np.array([0.0, 1.0])
    with pytest.raises(ValueError, match="at least 1 prompt and 1 output token"):
        Workload(times, np.array([5, 0]), np.array([5, 5]), 2.0)
    with pytest.raises(ValueError, match="finite"):
        Workload(times, np.array([5, 5]), np.array([5, 5]), float("inf"))


@pytest.mark.parametrize("scale", [0.0, -1.0, float("inf"), float("nan")])
def test_rate_scale_must_be_finite_and_positive(scale: float) -> None:
    trace = resolve_trace("azure-code")
    for mode in ("compress", "superpose"):
        with pytest.raises(ValueError, match="rate scale must be finite and > 0"):
            trace.scaled(scale, mode, np.random.default_rng(0))  # type: ignore[arg-type]


def test_a_window_past_the_end_of_the_trace_names_both() -> None:
    trace = resolve_trace("azure-code")
    with pytest.raises(ValueError, match=r"starts at 1200 s, after azure-code ends \(586.3 s\)"):
        trace.window(1200, 1800)
    assert trace.window(300, 1800).duration_s == pytest.approx(trace.duration_s - 300)


@pytest.mark.parametrize("cv", [0.0, 0.001, 101.0, float("nan")])
def test_gamma_burstiness_outside_its_range_is_refused(cv: float) -> None:
    with pytest.raises(ValueError, match=r"burstiness CV must be in \[0.01, 100"):
        synthetic_workload(deployment().spec.traffic, 10.0, np.random.default_rng(0), "gamma", cv)


@pytest.mark.parametrize("cv", [0.01, 100.0])
def test_gamma_burstiness_at_its_bounds_keeps_the_rate(cv: float) -> None:
    traffic = deployment().spec.traffic
    work = synthetic_workload(traffic, 2000.0, np.random.default_rng(0), "gamma", cv)
    assert np.isfinite(work.arrival_s).all()
    if cv < 1:  # very bursty traffic is a few huge bursts: its count is too noisy to check
        assert work.rate_per_s == pytest.approx(traffic.request_rate_per_second, rel=0.05)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("600", (0.0, 600.0)), ("5m:15m", (300.0, 900.0)), ("1h", (0.0, 3600.0))],
)
def test_parse_window(text: str, expected: tuple[float, float]) -> None:
    assert parse_window(text) == expected


@pytest.mark.parametrize("arrival", ["poisson", "gamma"])
def test_synthetic_traffic_has_the_declared_rate_and_lengths(arrival: str) -> None:
    traffic = deployment().spec.traffic
    rng = np.random.default_rng(11)
    load = synthetic_workload(traffic, 2000.0, rng, arrival, burstiness_cv=2.0)  # type: ignore[arg-type]
    assert load.rate_per_s == pytest.approx(traffic.request_rate_per_second, rel=0.1)
    prompt, output = traffic.resolved_lengths()
    assert load.prompt_tokens.mean() == pytest.approx(prompt.mean, rel=0.1)
    assert load.output_tokens.max() <= (output.max or np.inf)
    gaps = np.diff(load.arrival_s)
    cv = gaps.std() / gaps.mean()
    assert cv == pytest.approx(1.0 if arrival == "poisson" else 2.0, rel=0.15)


@pytest.mark.parametrize("family", ["fixed", "normal", "lognormal", "exponential"])
def test_length_distributions_keep_their_mean_and_bounds(family: str) -> None:
    dist = LengthDistribution(distribution=family, mean=400, stddev=150, max=1500)  # type: ignore[arg-type]
    values = sample_lengths(dist, 20000, np.random.default_rng(5))
    assert values.min() >= 1 and values.max() <= 1500
    assert values.mean() == pytest.approx(400, rel=0.05)


def test_example_cluster_loads_node_counts_from_status() -> None:
    cluster = load_cluster([EXAMPLES / "sim-cluster.yaml"])
    assert cluster.nodes == {"h100": 1, "a100": 2}
    assert cluster.total_accelerators == 24
    assert {o.name: o.free_accelerators for o in cluster.offers({"a100": 3})} == {
        "a100": 13,
        "h100": 8,
    }


def test_simulated_cluster_document_sets_nodes_caps_and_link(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(
        (EXAMPLES / "accelerator-classes.yaml").read_text()
        + "\n---\napiVersion: tessera.dev/v1alpha1\nkind: SimulatedCluster\n"
        "metadata: {name: lab}\nnodes: {l40s: 3}\npowerCapW: {l40s: 250}\nkvLinkGbps: 10\n"
    )
    cluster = load_cluster([path])
    assert cluster.name == "lab"
    assert cluster.accelerators("l40s") == 12
    assert cluster.power_cap_w == {"l40s": 250}
    assert cluster.kv_link_gbps == 10


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("nodes: {tpu: 1}", "undefined AcceleratorClass"),
        ("nodes: {l40s: 1}\npowerCapW: {l40s: 50}", "outside"),
        ("nodez: {l40s: 1}", "nodez"),
        ("nodes: {l40s: 1}\nkvLinkGbps: .inf", "kvLinkGbps: Input should be a finite number"),
        ("nodes: {l40s: 1}\npowerCapW: {l40s: .nan}", "powerCapW.l40s: Input should be a finite"),
        ("nodes: {l40s: 1" + "0" * 400 + "}", "nodes: Value error, must fit a Kubernetes int64"),
    ],
)
def test_cluster_errors_name_the_problem(tmp_path: Path, extra: str, message: str) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(
        (EXAMPLES / "accelerator-classes.yaml").read_text()
        + "\n---\napiVersion: tessera.dev/v1alpha1\nkind: SimulatedCluster\n"
        f"metadata: {{name: lab}}\n{extra}\n"
    )
    with pytest.raises((ClusterError, ValueError), match=message):
        load_cluster([path])
