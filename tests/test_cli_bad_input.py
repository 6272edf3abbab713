"""Bad input to `tessera validate`, `plan` and `simulate`: exit code 2, a line naming the flag or
field and its valid range, no traceback; nothing half-done."""

from __future__ import annotations

from pathlib import Path

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
