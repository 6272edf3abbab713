"""Every numeric flag of `tessera simulate` and `tessera plan` either runs or is refused with
exit code 2 and one error line naming the flag, whatever text it is given (hypothesis).

Runs stay short: five seconds of the bundled trace (or of synthetic traffic), one policy, and a
request limit lowered to 2,000 so that a value that would simulate a huge workload is refused
by the same check that bounds real runs (MAX_SIMULATED_REQUESTS) instead of running.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tessera.cli import main

ROOT = Path(__file__).resolve().parent.parent
DEPLOYMENT = ROOT / "examples" / "llama3-8b-chat.yaml"
CLASSES = ROOT / "examples" / "accelerator-classes.yaml"
TEST_REQUEST_LIMIT = 2_000

NUMBER_TEXT = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.sampled_from(
        ["0", "-0", "-1", "1e9", "1e-9", "nan", "inf", "-inf", "", " ", "abc", "1,5", "0x10", "²"]
    ),
    st.builds(
        "{}{}".format, st.integers(min_value=0, max_value=10**6), st.sampled_from(["s", "m", "h"])
    ),
    st.builds(
        "{}:{}".format,
        st.integers(min_value=-5, max_value=2000),
        st.integers(min_value=-5, max_value=2000),
    ),
    st.text(max_size=6),
).filter(lambda text: not text.startswith("--"))

SHORT = ["--no-sweep", "--no-plots", "--policy", "vllm"]
SIMULATE_FLAGS: dict[str, list[str]] = {
    "--rate-scale": [*SHORT, "--window", "5"],
    "--cv": [*SHORT, "--synthetic", "gamma", "--duration", "5s"],
    "--duration": [*SHORT, "--synthetic", "poisson"],
    "--window": SHORT,
    "--kv-link-gbps": ["--no-sweep", "--no-plots", "--policy", "disaggregated", "--window", "5"],
    "--seed": [*SHORT, "--window", "5"],
    "--sweep-steps": ["--sweep", "--no-plots", "--policy", "vllm", "--window", "5"],
}


@pytest.fixture(autouse=True)
def small_request_limit(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    import tessera.sim.cli
    import tessera.sim.experiment

    for module in (tessera.sim.cli, tessera.sim.experiment):
        monkeypatch.setattr(module, "MAX_SIMULATED_REQUESTS", TEST_REQUEST_LIMIT)
    yield


def check_outcome(args: list[str], flag: str) -> None:
    result = CliRunner().invoke(main, args)
    if result.exit_code == 0:
        return
    assert result.exit_code == 2, (args, result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), (args, result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, (args, result.output)
    assert flag in errors[0], (args, result.output)


@pytest.mark.parametrize("flag", sorted(SIMULATE_FLAGS))
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(value=NUMBER_TEXT)
def test_a_simulate_flag_runs_or_is_refused_naming_it(
    flag: str, value: str, tmp_path: Path
) -> None:
    check_outcome(
        ["simulate", *SIMULATE_FLAGS[flag], "--out", str(tmp_path / "out"), flag, value], flag
    )


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(value=NUMBER_TEXT)
def test_a_power_cap_runs_or_is_refused_naming_it(value: str, tmp_path: Path) -> None:
    check_outcome(
        [
            "simulate",
            *SIMULATE_FLAGS["--seed"],
            "--out",
            str(tmp_path / "out"),
            "--power-cap",
            f"a100={value}",
        ],
        "--power-cap",
    )


@settings(max_examples=25, deadline=None)
@given(value=NUMBER_TEXT, name=st.sampled_from(["h100", "a100", "l40s", "h200", ""]))
def test_a_plan_capacity_runs_or_is_refused_naming_it(value: str, name: str) -> None:
    args = ["plan", "-f", str(DEPLOYMENT), "--classes", str(CLASSES), "-o", "json"]
    result = CliRunner().invoke(main, [*args, "--capacity", f"{name}={value}"])
    if result.exit_code == 1:  # a valid capacity too small for the SLO: the planner says so
        assert "no feasible plan" in result.output, result.output
        return
    check_outcome([*args, "--capacity", f"{name}={value}"], "--capacity")
