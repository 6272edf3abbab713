"""Bad input to `tessera validate`, `plan` and `simulate`: exit code 2, a line naming the flag or
field and its valid range, no traceback; nothing half-done."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner, Result

from tessera.cli import main

ROOT = Path(__file__).resolve().parent.parent
DEPLOYMENT = ROOT / "examples" / "llama3-8b-chat.yaml"
CLASSES = ROOT / "examples" / "accelerator-classes.yaml"


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def assert_usage_error(result: Result, *needles: str) -> None:
    """Exit 2 with no traceback, and an error line naming every needle."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.splitlines() if all(n in line for n in needles)]
    assert lines, (needles, result.output)


def deployment_with(tmp_path: Path, **traffic: object) -> Path:
    document = yaml.safe_load(DEPLOYMENT.read_text())
    document["spec"]["traffic"].update(traffic)
    path = tmp_path / "deployment.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def test_validate_fails_on_an_empty_file_naming_it(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    comments = tmp_path / "comments.yaml"
    comments.write_text("# nothing here\n---\n")
    for path in (empty, comments):
        result = invoke("validate", str(DEPLOYMENT), str(path))
        assert_usage_error(result, str(path), "empty")
        assert "ModelDeployment/llama3-8b-chat ok" in result.output  # the good file is still read


def test_validate_rejects_infinity_naming_the_field_and_range(tmp_path: Path) -> None:
    path = tmp_path / "inf.yaml"
    path.write_text(
        DEPLOYMENT.read_text().replace("requestRatePerSecond: 5.4", "requestRatePerSecond: .inf")
    )
    assert ".inf" in path.read_text()
    result = invoke("validate", str(path))
    assert_usage_error(result, "spec.traffic.requestRatePerSecond", "finite", "> 0")


SIM = ("simulate", "--no-sweep", "--no-plots", "--policy", "vllm", "--window", "20")


@pytest.mark.parametrize(
    ("flags", "flag", "valid"),
    [
        (["--kv-link-gbps", "-5"], "--kv-link-gbps", "0.01<=x<=10000"),
        (["--kv-link-gbps", "0"], "--kv-link-gbps", "0.01<=x<=10000"),
        (["--kv-link-gbps", "1e-300"], "--kv-link-gbps", "0.01<=x<=10000"),
        (["--kv-link-gbps", "nan"], "--kv-link-gbps", "finite"),
        (["--rate-scale", "inf"], "--rate-scale", "0.001<=x<=10000"),
        (["--rate-scale", "nan"], "--rate-scale", "finite"),
        (["--rate-scale", "0"], "--rate-scale", "0.001<=x<=10000"),
        (["--rate-scale", "-2"], "--rate-scale", "0.001<=x<=10000"),
        (["--rate-mode", "superpose", "--rate-scale", "1e9"], "--rate-scale", "x<=10000"),
        (["--duration", "0", "--synthetic", "poisson"], "--duration", "> 0"),
        (["--duration", "0"], "--duration", "> 0"),
        (["--duration", "9" * 400 + "h", "--synthetic", "poisson"], "--duration", "too long"),
        (["--cv", "0", "--synthetic", "gamma"], "--cv", "0.01<=x<=100"),
        (["--cv", "inf", "--synthetic", "gamma"], "--cv", "0.01<=x<=100"),
        (["--sweep-steps", "-3"], "--sweep-steps", "0<=x<=20"),
        (["--seed", "-1"], "--seed", "x>=0"),
        (["--power-cap", "h100=nan"], "--power-cap", "finite"),
        (["--power-cap", "h100=900"], "--power-cap", "[200, 700] W"),
        (["--power-cap", "h100"], "--power-cap", "CLASS=WATTS"),
        (["--power-cap", "h100=300", "--power-cap", "h100=400"], "--power-cap", "twice"),
        (["--trace", "missing.csv"], "--trace", "bundled trace"),
    ],
)
def test_simulate_refuses_bad_flags_naming_the_flag_and_range(
    flags: list[str], flag: str, valid: str, tmp_path: Path
) -> None:
    result = invoke(*SIM, "--out", str(tmp_path / "out"), *flags)
    assert_usage_error(result, flag, valid)
    assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.parametrize(
    ("window", "valid"),
    [("20m:30m", "after azure-conv ends (600.2 s); valid: START < 600.2 s"), ("5m:3m", "ends")],
)
def test_simulate_refuses_a_window_outside_the_trace(
    window: str, valid: str, tmp_path: Path
) -> None:
    args = [a for a in SIM if a not in ("--window", "20")]
    result = invoke(*args, "--out", str(tmp_path), "--window", window)
    assert_usage_error(result, "--window", valid)


def test_simulate_refuses_a_window_with_no_request(tmp_path: Path) -> None:
    trace = tmp_path / "gap.csv"
    trace.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:00:00.0,300,40\n2023-11-16 18:00:01.0,300,40\n"
        "2023-11-16 18:01:00.0,300,40\n2023-11-16 18:01:01.0,300,40\n"
    )
    args = [a for a in SIM if a not in ("--window", "20")]
    result = invoke(*args, "--out", str(tmp_path), "--trace", str(trace), "--window", "10:50")
    assert_usage_error(result, "--window", "no request of gap arrives in [10, 50) s")


def test_simulate_bounds_the_superposed_request_count(tmp_path: Path) -> None:
    """Superposing multiplies requests: 2000 copies of the ten-minute window would have grown
    memory for an hour; it is refused at once, naming the flag and the scale that fits."""
    args = [a for a in SIM if a not in ("--window", "20")]
    result = invoke(
        *args, "--out", str(tmp_path), "--rate-mode", "superpose", "--rate-scale", "2000"
    )
    assert_usage_error(result, "--rate-scale", "at most 4,000,000", "rate scale <= 1395")


def test_simulate_bounds_synthetic_traffic_from_a_huge_declared_rate(tmp_path: Path) -> None:
    deployment = deployment_with(tmp_path, requestRatePerSecond=1e300)
    result = invoke(
        *SIM, "--out", str(tmp_path), "--synthetic", "poisson", "--deployment", str(deployment)
    )
    assert_usage_error(result, "--duration", "requestRatePerSecond", "at most 4,000,000")


@pytest.mark.parametrize("rate", [".inf", ".nan", "-1"])
def test_plan_and_simulate_refuse_a_non_finite_declared_rate(rate: str, tmp_path: Path) -> None:
    path = tmp_path / "rate.yaml"
    path.write_text(
        DEPLOYMENT.read_text().replace("requestRatePerSecond: 5.4", f"requestRatePerSecond: {rate}")
    )
    result = invoke("plan", "-f", str(path), "--classes", str(CLASSES))
    assert_usage_error(result, "spec.traffic.requestRatePerSecond", "(valid range: > 0)")
    assert "-f" in result.output
    result = invoke(*SIM, "--out", str(tmp_path), "--deployment", str(path))
    assert_usage_error(result, "spec.traffic.requestRatePerSecond", "(valid range: > 0)")
    assert "--deployment" in result.output


def test_simulate_refuses_an_empty_deployment_or_cluster_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    result = invoke(*SIM, "--out", str(tmp_path), "--deployment", str(empty))
    assert_usage_error(result, "--deployment", str(empty), "empty")
    result = invoke(*SIM, "--out", str(tmp_path), "--cluster", str(empty))
    assert_usage_error(result, "--cluster")


def test_simulate_refuses_an_output_folder_it_cannot_make(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = invoke(*SIM, "--out", str(blocker / "out"))
    assert_usage_error(result, "--out")


def test_a_zero_token_trace_row_is_refused_naming_file_line_and_column(tmp_path: Path) -> None:
    trace = tmp_path / "zero.csv"
    trace.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:00:00.0,300,40\n2023-11-16 18:00:01.0,300,0\n"
    )
    args = [a for a in SIM if a not in ("--window", "20")]
    result = invoke(*args, "--out", str(tmp_path), "--trace", str(trace))
    assert_usage_error(result, "--trace", str(trace), "line 3", "GeneratedTokens", "[1, ")


@pytest.mark.parametrize(
    ("capacity", "valid"),
    [
        ("h100=-1", "CLASS=COUNT"),
        ("h100=²", "CLASS=COUNT"),
        ("h100=1.5", "CLASS=COUNT"),
        ("h10=4", "no AcceleratorClass h10"),
        ("=4", "CLASS=COUNT"),
    ],
)
def test_plan_refuses_a_bad_capacity_naming_the_flag(capacity: str, valid: str) -> None:
    result = invoke(
        "plan", "-f", str(DEPLOYMENT), "--classes", str(CLASSES), "--capacity", capacity
    )
    assert_usage_error(result, "--capacity", valid)


def test_plan_refuses_empty_files_naming_the_flag(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    result = invoke("plan", "-f", str(empty), "--classes", str(CLASSES))
    assert_usage_error(result, "-f", str(empty))
    result = invoke("plan", "-f", str(DEPLOYMENT), "--classes", str(empty))
    assert_usage_error(result, "--classes", str(empty))
    result = invoke("plan", "-f", str(DEPLOYMENT), "--classes", str(DEPLOYMENT))
    assert_usage_error(result, "--classes", "no AcceleratorClass")


def test_plan_refuses_an_integer_the_api_server_cannot_store(tmp_path: Path) -> None:
    """A 400-digit numLayers validated, then crashed the planner with OverflowError."""
    document = yaml.safe_load(DEPLOYMENT.read_text())
    document["spec"]["model"]["architecture"]["numLayers"] = 10**400
    path = tmp_path / "huge.yaml"
    path.write_text(yaml.safe_dump(document))
    result = invoke("plan", "-f", str(path), "--classes", str(CLASSES))
    assert_usage_error(result, "spec.model.architecture.numLayers", "int64", "> 0")


def test_validate_refuses_a_binary_file_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    assert_usage_error(invoke("validate", str(path)), str(path))
