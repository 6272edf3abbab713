"""The CRDs' CEL validation rules, evaluated by a CEL implementation (cel-python), and the
CRDs generated per target Kubernetes version.

The test server (kube-apiserver 1.20) has no CEL, so the rules are evaluated here as the API
server evaluates them: at every node of the object that the rule's schema node describes, on the
object with the schema's defaults applied, with `type: number` values as doubles. A rule that
errors (no such field, division by zero) rejects the object, as on the server.

For every rule in the generated CRDs there is an object that it admits and one that it rejects;
each such object passes the rest of the schema (so the CEL rule is what decides) and the
pydantic models agree with the verdict (one contract, two enforcers).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import celpy
import jsonschema
import pytest
import yaml
from api_samples import chat_deployment
from click.testing import CliRunner
from pydantic import ValidationError
from tessera.api.crdgen import (
    CEL_RULES,
    build_crds,
    crds_command,
    parse_kube_version,
    supports_cel,
    without_cel,
)
from tessera.api.loader import RESOURCE_TYPES

Obj = dict[str, Any]
CEL = celpy.Environment()


def schema_of(kind: str, kube_version: str | None = None) -> Obj:
    for crd in build_crds(kube_version):
        if crd["spec"]["names"]["kind"] == kind:
            schema: Obj = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
            return schema
    raise KeyError(kind)


def rule_sites(schema: Obj, path: str = "") -> Iterator[tuple[str, str, str]]:
    """(schema path, rule, message) of every CEL rule in a schema."""
    for rule in schema.get(CEL_RULES, []):
        yield path, rule["rule"], rule["message"]
    for name, child in (schema.get("properties") or {}).items():
        yield from rule_sites(child, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from rule_sites(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from rule_sites(schema["additionalProperties"], f"{path}{{}}")


def defaulted(schema: Obj, value: Any) -> Any:
    """The value with the schema's defaults applied (the API server defaults before it
    validates), numbers typed as the schema says."""
    if value is None:
        return None
    kind = schema.get("type")
    if kind == "number":
        return float(value)
    if kind == "array" and isinstance(schema.get("items"), dict):
        return [defaulted(schema["items"], item) for item in value]
    if kind != "object" or not isinstance(value, dict):
        return value
    result = dict(value)
    properties = schema.get("properties") or {}
    for name, child in properties.items():
        if name not in result and "default" in child:
            result[name] = copy.deepcopy(child["default"])
        if name in result:
            result[name] = defaulted(child, result[name])
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        for name in set(result) - set(properties):
            result[name] = defaulted(extra, result[name])
    return result


@dataclass(frozen=True)
class Verdict:
    site: str
    """The schema path of the rule, e.g. `.spec.traffic`."""
    rule: str
    admitted: bool
    detail: str


def evaluate(rule: str, value: Any) -> tuple[bool, str]:
    program = CEL.program(CEL.compile(rule))
    try:
        result = program.evaluate({"self": celpy.json_to_cel(value)})
    except celpy.CELEvalError as error:
        return False, f"error: {error.args[0] if error.args else error}"
    if isinstance(result, celpy.CELEvalError):
        return False, f"error: {result.args[0] if result.args else result}"
    return bool(result), str(result)


def verdicts(schema: Obj, value: Any, path: str = "") -> Iterator[Verdict]:
    """Every CEL rule of `schema` evaluated at every node of a defaulted `value` it describes."""
    if value is None:
        return
    for rule in schema.get(CEL_RULES, []):
        admitted, detail = evaluate(rule["rule"], value)
        yield Verdict(path, rule["rule"], admitted, detail)
    if isinstance(value, dict):
        properties = schema.get("properties") or {}
        for name, child in value.items():
            if name in properties:
                yield from verdicts(properties[name], child, f"{path}.{name}")
            elif isinstance(schema.get("additionalProperties"), dict):
                yield from verdicts(schema["additionalProperties"], child, f"{path}{{}}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            yield from verdicts(schema["items"], item, f"{path}[]")


def power_budget() -> Obj:
    return {
        "apiVersion": "tessera.dev/v1alpha1",
        "kind": "PowerBudget",
        "metadata": {"name": "row-a"},
        "spec": {"budgetW": 12000},
    }


Mutation = Callable[[Obj], object]


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[], Obj]
    mutate: Mutation
    rejected_at: str | None
    """The rule site that rejects the object; None: every rule admits it."""

    def document(self) -> Obj:
        document = self.make()
        self.mutate(document)
        return document


def _spec(path: str, **values: Any) -> Mutation:
    def mutate(document: Obj) -> None:
        node = document["spec"]
        for part in path.split(".") if path else []:
            node = node.setdefault(part, {})
        node.update(values)

    return mutate


def _drop(path: str, key: str) -> Mutation:
    def mutate(document: Obj) -> None:
        node = document["spec"]
        for part in path.split("."):
            node = node[part]
        del node[key]

    return mutate


def _all_pools(minimum: int, maximum: int) -> Mutation:
    def mutate(document: Obj) -> None:
        document["spec"]["pools"] = {
            role: {"minReplicas": minimum, "maxReplicas": maximum}
            for role in ("colocated", "prefill", "decode", "attention")
        }

    return mutate


LENGTHS = {"distribution": "lognormal", "mean": 512, "stddev": 128}


def _lengths_instead_of_profile(*fields: str) -> Mutation:
    def mutate(document: Obj) -> None:
        traffic = document["spec"]["traffic"]
        del traffic["profile"]
        traffic.update({field: dict(LENGTHS) for field in fields})

    return mutate


CASES = [
    Case("chat-example", chat_deployment, lambda d: None, None),
    Case("all-pools-bounded", chat_deployment, _all_pools(1, 4), None),
    Case("equal-pool-bounds", chat_deployment, _all_pools(4, 4), None),
    Case("defaults-only-pools", chat_deployment, _all_pools(0, 64), None),
    *(
        Case(
            f"{role}-min-above-max",
            chat_deployment,
            _spec(f"pools.{role}", minReplicas=5, maxReplicas=4),
            f".spec.pools.{role}",
        )
        for role in ("colocated", "prefill", "decode", "attention")
    ),
    Case(
        "default-max-below-min",
        chat_deployment,
        lambda d: d["spec"]["pools"].update(decode={"minReplicas": 65}),
        ".spec.pools.decode",
    ),
    Case(
        "explicit-lengths-no-profile",
        chat_deployment,
        _lengths_instead_of_profile("promptTokens", "outputTokens"),
        None,
    ),
    Case(
        "prompt-lengths-only",
        chat_deployment,
        _lengths_instead_of_profile("promptTokens"),
        ".spec.traffic",
    ),
    Case("no-profile-no-lengths", chat_deployment, _drop("traffic", "profile"), ".spec.traffic"),
    Case(
        "grouped-query-attention",
        chat_deployment,
        _spec("model.architecture", numAttentionHeads=32, numKeyValueHeads=8),
        None,
    ),
    Case(
        "heads-not-a-multiple-of-kv-heads",
        chat_deployment,
        _spec("model.architecture", numAttentionHeads=32, numKeyValueHeads=6),
        ".spec.model.architecture",
    ),
    Case(
        "vllm-colocated",
        chat_deployment,
        _spec("", servingMode="colocated", engine={"kind": "vllm"}),
        None,
    ),
    Case(
        "vllm-disaggregated",
        chat_deployment,
        _spec("", servingMode="disaggregated", engine={"kind": "vllm"}),
        ".spec",
    ),
    Case("vllm-by-default-auto", chat_deployment, _spec("", engine={"kind": "vllm"}), ".spec"),
    Case("budget-defaults", power_budget, lambda d: None, None),
    Case(
        "ordered-thresholds",
        power_budget,
        _spec("thresholds", uncapBelow=0.8, capAbove=0.9, emergencyAbove=0.9),
        None,
    ),
    Case(
        "uncap-not-below-cap",
        power_budget,
        _spec("thresholds", uncapBelow=0.95, capAbove=0.95),
        ".spec.thresholds",
    ),
    Case(
        "emergency-below-cap",
        power_budget,
        _spec("thresholds", capAbove=1.2, emergencyAbove=1.1),
        ".spec.thresholds",
    ),
    Case("integer-thresholds", power_budget, _spec("thresholds", emergencyAbove=1), None),
]


def _rejections(document: Obj) -> set[str]:
    schema = schema_of(document["kind"])
    found = verdicts(schema, defaulted(schema, document))
    return {verdict.site for verdict in found if not verdict.admitted}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_cel_rules_admit_and_reject_as_the_models_do(case: Case) -> None:
    document = case.document()
    schema = schema_of(document["kind"])
    # The rest of the schema admits the object: the CEL rule alone decides.
    jsonschema.Draft4Validator(without_cel(schema)).validate(document)
    rejected = _rejections(document)
    assert rejected == ({case.rejected_at} if case.rejected_at else set())
    model = RESOURCE_TYPES[document["kind"]]
    if case.rejected_at is None:
        model.model_validate(document)
    else:
        with pytest.raises(ValidationError):
            model.model_validate(document)


def test_every_rule_has_an_object_it_admits_and_one_it_rejects() -> None:
    sites = {
        (crd["spec"]["names"]["kind"], site)
        for crd in build_crds()
        for site, _, _ in rule_sites(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    }
    assert len(sites) >= 7, sites
    admitted: set[tuple[str, str]] = set()
    rejected: set[tuple[str, str]] = set()
    for case in CASES:
        document = case.document()
        schema = schema_of(document["kind"])
        for verdict in verdicts(schema, defaulted(schema, document)):
            key = (document["kind"], verdict.site)
            (admitted if verdict.admitted else rejected).add(key)
    assert sites - admitted == set(), "rules no case admits an object for"
    assert sites - rejected == set(), "rules no case rejects an object for"


def test_evaluation_errors_reject_as_on_the_server() -> None:
    """A rule that cannot be evaluated (a missing field) rejects the object."""
    assert evaluate("self.minReplicas <= self.maxReplicas", {"maxReplicas": 3})[0] is False


# --- CRDs per Kubernetes version ----------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "cel"),
    [("1.20", False), ("1.20.2", False), ("v1.24.9", False), ("1.25", True), ("1.30.1-eks", True)],
)
def test_cel_rules_only_for_servers_that_evaluate_them(version: str, cel: bool) -> None:
    assert supports_cel(version) is cel
    text = yaml.safe_dump(build_crds(version))
    assert (CEL_RULES in text) is cel


def test_without_cel_the_schema_is_otherwise_identical() -> None:
    newest, old = build_crds(), build_crds("1.20")
    assert build_crds(None) == newest and CEL_RULES in yaml.safe_dump(newest)
    assert [without_cel(crd) for crd in newest] == old


@pytest.mark.parametrize("bad", ["", "one.twenty", "1", "1.x", "latest"])
def test_a_bad_kube_version_is_named_with_its_form(bad: str) -> None:
    with pytest.raises(ValueError, match=r"MAJOR\.MINOR"):
        parse_kube_version(bad)
    result = CliRunner().invoke(crds_command, ["--stdout", "--kube-version", bad])
    assert result.exit_code == 2
    assert "--kube-version" in result.output and "MAJOR.MINOR" in result.output
    assert "Traceback" not in result.output


def test_crds_command_prints_the_variant_for_the_version() -> None:
    runner = CliRunner()
    old = runner.invoke(crds_command, ["--stdout", "--kube-version", "1.20"])
    new = runner.invoke(crds_command, ["--stdout"])
    assert old.exit_code == new.exit_code == 0
    assert list(yaml.safe_load_all(old.output)) == build_crds("1.20")
    assert list(yaml.safe_load_all(new.output)) == build_crds()


def test_crds_command_writes_a_version_into_a_folder(tmp_path: Any) -> None:
    result = CliRunner().invoke(crds_command, ["-o", str(tmp_path), "--kube-version", "1.20"])
    assert result.exit_code == 0, result.output
    written = [yaml.safe_load(p.read_text()) for p in sorted(tmp_path.glob("*.yaml"))]
    assert written == build_crds("1.20")


def test_kube_version_without_a_destination_is_a_usage_error() -> None:
    result = CliRunner().invoke(crds_command, ["--kube-version", "1.20"])
    assert result.exit_code == 2 and "--stdout or --output-dir" in result.output
