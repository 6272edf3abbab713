"""`tessera plan`: the plan as data, the alternatives with their predicted attainment, the
simulated score with --simulate, and a clear failure for an infeasible spec."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from click.testing import CliRunner

from tessera.cli import main

ROOT = Path(__file__).resolve().parent.parent
DEPLOYMENT = ROOT / "examples" / "llama3-8b-chat.yaml"
CLASSES = ROOT / "examples" / "accelerator-classes.yaml"


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["plan", *args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_json_plan_carries_predicted_and_simulated_attainment() -> None:
    code, out, _ = run("-f", str(DEPLOYMENT), "--classes", str(CLASSES), "-o", "json")
    assert code == 0
    (analytical,) = json.loads(out).values()
    assert 0.9 <= analytical["predictedAttainment"] <= 1.0
    for pool in analytical["pools"]:
        assert pool["maxRunningRequests"] >= 1
    assert "simulatedAttainment" not in analytical

    code, out, _ = run("-f", str(DEPLOYMENT), "--classes", str(CLASSES), "-o", "json", "--simulate")
    assert code == 0
    (simulated,) = json.loads(out).values()
    assert 0.0 <= simulated["simulatedAttainment"] <= 1.0
    assert "simulated attainment" in simulated["rationale"]


def test_explain_lists_alternatives_with_their_predicted_attainment() -> None:
    code, out, _ = run("-f", str(DEPLOYMENT), "--classes", str(CLASSES), "--explain")
    assert code == 0
    assert "Top alternatives" in out
    assert "attain." in out
    plan, alternatives = out.split("Top alternatives", 1)
    assert "%" in alternatives
    # The colocated variants are alternatives of their own, named by how they prefill.
    assert "colocated, chunked prefill 512" in alternatives
    assert "colocated, whole prompts" in alternatives
    assert "max seqs" in plan and "whole prompts" in plan


def test_an_infeasible_deployment_fails_naming_the_constraint(tmp_path: Path) -> None:
    document = yaml.safe_load(DEPLOYMENT.read_text())
    document["spec"]["slo"]["tpotMs"] = 1
    path = tmp_path / "tight.yaml"
    path.write_text(yaml.safe_dump(document))
    code, _, err = run("-f", str(path), "--classes", str(CLASSES))
    assert code == 1
    assert "slo.tpotMs" in err
